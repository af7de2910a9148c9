"""``python -m pcbedge``: the same command as ``pcbedge``."""
from pcbedge.cli import main

if __name__ == "__main__":
    main()
