"""Run an arm64 bundle on a real arm64 userland (Debian under qemu-user-static) and check that
it answers as on the x86 build host, and that its accuracy drift against FP32, computed on the
arm64 side, passes the profile's gates.

    python scripts/arm64_check.py prepare                      # once: the arm64 root (cached)
    python scripts/arm64_check.py run --bundle bundles/arm64-cpu --reference bundles/export \\
        --data ../shared/data/deeppcb --list pcbedge/data/splits/deeppcb_val.txt --boards 50 \\
        --out arm64-out

``prepare`` (root, Debian/Ubuntu host): installs ``qemu-user-static binfmt-support
debootstrap`` if missing, registers binfmt (mounting ``binfmt_misc`` where the sandbox has not),
debootstraps a minimal bookworm arm64 root with python3 into ``--root`` (default
``~/.cache/pcbedge/arm64-root``), and installs the device-side package there (``pip install .``
from a copy of this checkout: onnxruntime, numpy, pillow, tokenizers, click, jinja2 aarch64
wheels from PyPI; no torch). It is re-run only when the package's source changes.

``run`` copies the bundle, its FP32 reference and ``--boards`` boards of the list into the root
(a work folder per ``--out``, kept until the check completes), then benches the bundle twice with the same boards and questions: on the x86 host
(``PCBEDGE_ALLOW_FOREIGN_ARCH=1``: the same arm64 bundle, x86 kernels) and inside the arm64 root
(ARM kernels, chroot + qemu). It compares the answers board by board (same defects, boxes within
``--box-tol`` px, confidences within ``--conf-tol``), the preprocessed inputs, and the residual
INT8 score bias of the vision graph on both instruction sets, and writes ``OUT/arm64_check.json``.
Latency inside the root is qemu emulation (tens of times slower than a real ARM core) and is
reported only as such. Both benches run with ``--resume``: a check stopped midway (it takes
hours under emulation) and run again with the same ``--out`` reuses every board already
answered. Exit 0 when everything agrees and the arm64 gates pass, 1 otherwise.
"""
from __future__ import annotations

import argparse
import contextlib
import fcntl
import hashlib
import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
DEFAULT_ROOT = Path(os.environ.get("PCBEDGE_ARM64_ROOT",
                                   Path.home() / ".cache" / "pcbedge" / "arm64-root"))
VENV = "/opt/pcbedge-venv"
SUITE, MIRROR = "bookworm", "http://deb.debian.org/debian"
READY = ".pcbedge-ready"
BUSY = 75                   # exit code of a --no-wait run that found the root in use (EX_TEMPFAIL)
NO_WAIT = {"on": False}     # --no-wait: give up instead of waiting for the root lock
LOCK = ".pcbedge-lock"      # shared while a run uses the root, exclusive while prepare installs
# bench options for a run that checks answers, not speed: one timed query, gates on accuracy
NO_LATENCY = ["--queries", "1", "--min-seconds", "0", "--warmup", "0", "--p95-ms-max", "1e9"]


def sh(cmd: list[str], **kw) -> subprocess.CompletedProcess:
    print("+", " ".join(str(c) for c in cmd), flush=True)
    return subprocess.run([str(c) for c in cmd], check=True, **kw)


def source_hash() -> str:
    h = hashlib.sha256()
    for p in sorted((REPO / "pcbedge").rglob("*")):
        if p.is_file() and "__pycache__" not in p.parts and "sample" not in p.parts:
            h.update(p.relative_to(REPO).as_posix().encode())
            h.update(p.read_bytes())
    h.update((REPO / "pyproject.toml").read_bytes())
    return h.hexdigest()[:16]


def ensure_binfmt() -> None:
    if not shutil.which("qemu-aarch64-static") or not shutil.which("debootstrap"):
        sh(["apt-get", "update", "-qq"])
        sh(["apt-get", "install", "-y", "-qq", "qemu-user-static", "binfmt-support",
            "debootstrap"])
    binfmt = Path("/proc/sys/fs/binfmt_misc")
    if not (binfmt / "register").exists():
        sh(["mount", "-t", "binfmt_misc", "binfmt_misc", str(binfmt)])
    if not (binfmt / "qemu-aarch64").exists():
        sh(["update-binfmts", "--enable", "qemu-aarch64"])


def prepare(root: Path) -> None:
    ensure_binfmt()
    if not (root / "usr" / "bin" / "python3").exists():
        root.parent.mkdir(parents=True, exist_ok=True)
        sh(["debootstrap", "--arch=arm64", "--variant=minbase",
            "--include=python3,python3-venv,python3-pip", SUITE, root, MIRROR])
    for f in ("/etc/resolv.conf", "/etc/ssl/certs/ca-certificates.crt"):
        if Path(f).exists():   # pip inside the root needs DNS and the CA bundle
            (root / f.lstrip("/")).parent.mkdir(parents=True, exist_ok=True)
            shutil.copyfile(f, root / f.lstrip("/"))
    want = source_hash()
    if (root / READY).exists() and (root / READY).read_text() == want:
        print(f"arm64 root {root} is ready (package {want})")
        return
    with root_lock(root, exclusive=True):
        _install(root, want)


@contextlib.contextmanager
def root_lock(root: Path, *, exclusive: bool):
    """Runs share the root (each in its own work folder); installing the package waits until no
    run uses it, and runs wait for an install to finish."""
    with open(root / LOCK, "a") as f:
        try:
            fcntl.flock(f, (fcntl.LOCK_EX if exclusive else fcntl.LOCK_SH) | fcntl.LOCK_NB)
        except BlockingIOError:
            what = "install the package" if exclusive else "run"
            if NO_WAIT["on"]:
                print(f"the arm64 root {root} is in use by another run; --no-wait: not waiting "
                      f"to {what}", flush=True)
                sys.exit(BUSY)
            print(f"waiting for the arm64 root lock (to {what})", flush=True)
            fcntl.flock(f, fcntl.LOCK_EX if exclusive else fcntl.LOCK_SH)
        try:
            yield f
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


def _install(root: Path, want: str) -> None:
    if (root / READY).exists() and (root / READY).read_text() == want:
        return   # another process installed it while this one waited
    src = root / "opt" / "pcbedge-src"
    shutil.rmtree(src, ignore_errors=True)
    shutil.copytree(REPO / "pcbedge", src / "pcbedge",
                    ignore=shutil.ignore_patterns("__pycache__", "*.pyc"))
    for f in ("pyproject.toml", "README.md"):
        shutil.copyfile(REPO / f, src / f)
    chroot(root, ["python3", "-m", "venv", VENV])
    env = {"PIP_CERT": "/etc/ssl/certs/ca-certificates.crt"}
    chroot(root, [f"{VENV}/bin/pip", "install", "-q", "--upgrade", "pip"], env)
    chroot(root, [f"{VENV}/bin/pip", "install", "-q", "/opt/pcbedge-src"], env)
    chroot(root, [f"{VENV}/bin/python", "-c",
                  "import platform, onnxruntime, pcbedge, sys; "
                  "print(platform.machine(), onnxruntime.__version__, 'torch' in sys.modules)"])
    (root / READY).write_text(want)


def chroot(root: Path, cmd: list, env: dict | None = None, check: bool = True):
    """Run ``cmd`` inside the arm64 root (qemu-user via binfmt), with a clean environment."""
    env = {"PATH": "/usr/bin:/bin", "HOME": "/root", "LANG": "C.UTF-8", **(env or {})}
    full = ["chroot", root, "/usr/bin/env", "-i", *[f"{k}={v}" for k, v in env.items()], *cmd]
    print("+ [arm64]", " ".join(str(c) for c in cmd), flush=True)
    return subprocess.run([str(c) for c in full], check=check)


def stage_boards(data: Path, list_file: Path, n: int, dest: Path) -> Path:
    """``n`` boards spread evenly over the list (every design of a validation list), with their
    test, template and annotation files, under ``dest``; returns its list file."""
    from pcbedge.data.deeppcb import read_list
    every = read_list(data, list_file)
    step = max(1, len(every) // max(n, 1))
    boards = every[::step][:n]
    lines = []
    for b in boards:
        for p in (b.test_path, b.template_path, b.annotation_path):
            rel = Path(p).relative_to(data)
            (dest / rel).parent.mkdir(parents=True, exist_ok=True)
            shutil.copyfile(p, dest / rel)
        lines.append(f"{Path(b.test_path).relative_to(data).as_posix().replace('_test', '')} "
                     f"{Path(b.annotation_path).relative_to(data).as_posix()}")
    (dest / "boards.txt").write_text("\n".join(lines) + "\n")
    return dest / "boards.txt"


PROBE = r'''
import json, sys
import numpy as np
from pathlib import Path
from pcbedge.data.deeppcb import read_list
from pcbedge.data.preprocess import load_pair
from pcbedge.families.pcbvlm.recipe import iter_vision_inputs
from pcbedge.families.pcbvlm.score_bias import decision_band, dihedral_views, estimate_score_bias
bundle, ref, data, out = (Path(a) for a in sys.argv[1:5])
n_bias = int(sys.argv[5])
m = json.loads((bundle / "manifest.json").read_text())
size = int(m["input_size"])
boards = read_list(data, data / "boards.txt")
pre = {b.id: float(np.float64(load_pair(b.test_path, b.template_path, size)[0]).sum())
       for b in boards}
class S: entries = [type("E", (), {"test_path": b.test_path, "template_path": b.template_path})
                    for b in boards[:n_bias]]
center = float(m["answer"]["grammar"].get("region_prior_center", 0.5))
bias = estimate_score_bias(ref / "vision.onnx", bundle / "vision.onnx",
                           dihedral_views(iter_vision_inputs(S, size)), decision_band(center))
out.write_text(json.dumps({"preprocess_sums": pre, "residual_score_bias": bias}))
'''


def compare_predictions(x86: Path, arm: Path, box_tol: float, conf_tol: float) -> dict:
    def load(p):
        return {json.loads(line)["id"]: json.loads(line)["defects"]
                for line in p.read_text().splitlines() if line.strip()}
    a, b = load(x86), load(arm)
    worst_box = worst_conf = 0.0
    differ = []
    for k in a:
        da, db = a[k], b.get(k, [])
        key = lambda d: (d["type"], round(d["bbox"][0]), round(d["bbox"][1]))  # noqa: E731
        da, db = sorted(da, key=key), sorted(db, key=key)
        if [d["type"] for d in da] != [d["type"] for d in db]:
            differ.append(k)
            continue
        for p, q in zip(da, db):
            worst_box = max(worst_box, max(abs(u - v) for u, v in zip(p["bbox"], q["bbox"])))
            if p.get("confidence") is not None:
                worst_conf = max(worst_conf, abs(p["confidence"] - q["confidence"]))
    n_def = sum(len(v) for v in a.values())
    return {"boards": len(a), "defects_x86": n_def,
            "defects_arm64": sum(len(v) for v in b.values()),
            "boards_with_other_defects": differ, "max_box_diff_px": worst_box,
            "max_confidence_diff": worst_conf,
            "agree": not differ and worst_box <= box_tol and worst_conf <= conf_tol}


_NUMBER = re.compile(r"\d+(?:\.\d+)?")


def texts_agree(t: str, u: str, box_tol: float, conf_tol: float) -> bool:
    """The same words, and every printed number within what the tolerances allow once printed:
    a decimal (a confidence, two places) within ``conf_tol`` + 0.01, an integer (a box edge in
    pixels) within ``box_tol`` + 1; a tolerance of 0 asks for the same number. Floating-point
    kernels of two instruction sets may put a value on either side of a rounding boundary
    (confidence 0.985 prints 0.99 or 0.98, a box edge 520.5 prints 520 or 521); a count or a
    type that differs is caught by the defect lists, which are compared exactly."""
    if _NUMBER.split(t) != _NUMBER.split(u):
        return False
    for x, y in zip(_NUMBER.findall(t), _NUMBER.findall(u)):
        tol, step = (conf_tol, 0.01) if "." in x + y else (box_tol, 1.0)   # printed resolution
        if abs(float(x) - float(y)) > (tol + step if tol > 0 else 0.0) + 1e-9:
            return False
    return True


def compare_all_answers(x86: Path, arm: Path, box_tol: float, conf_tol: float) -> dict:
    """Every answer of every question (the benches' --resume caches, same keys on both sides):
    the same defects (types exactly, boxes within ``box_tol`` px, confidences within
    ``conf_tol``) and the same answer text up to the printed rounding of those numbers
    (:func:`texts_agree`); texts that differ at all are counted too."""
    def load(p):
        out = {}
        for n, line in enumerate(p.read_text().splitlines()):
            if n and line.strip():
                doc = json.loads(line)
                out[doc["key"]] = doc["answers"]
        return out
    a, b = load(x86), load(arm)
    n = text_differ = text_beyond = defect_differ = 0
    worst_box = worst_conf = 0.0
    for key, answers in a.items():
        for p, q in zip(answers, b.get(key, [])):
            n += 1
            text_differ += p.get("answer") != q.get("answer")
            text_beyond += not texts_agree(p.get("answer") or "", q.get("answer") or "",
                                           box_tol, conf_tol)
            dp, dq = p.get("defects") or [], q.get("defects") or []
            if [d["type"] for d in dp] != [d["type"] for d in dq]:
                defect_differ += 1
                continue
            for u, v in zip(dp, dq):
                worst_box = max(worst_box, max(abs(x - y) for x, y in zip(u["bbox"], v["bbox"])))
                if u.get("confidence") is not None and v.get("confidence") is not None:
                    worst_conf = max(worst_conf, abs(u["confidence"] - v["confidence"]))
    missing = sum(len(v) for k, v in a.items()) - n
    return {"answers_compared": n, "answers_missing_on_arm64": missing,
            "answer_text_differs": text_differ,
            "answer_text_differs_beyond_rounding": text_beyond, "defect_lists_differ": defect_differ,
            "max_box_diff_px": worst_box, "max_confidence_diff": worst_conf,
            "agree": n > 0 and not missing and not text_beyond and not defect_differ
            and worst_box <= box_tol and worst_conf <= conf_tol}


def mount_proc(root: Path) -> list[Path]:
    """Mount /proc inside the root (psutil reads it). /sys stays unmounted on purpose: with the
    host's /sys visible, onnxruntime's cpuinfo takes the x86 topology for ARM and qemu 7.2
    segfaults; without it cpuinfo logs that it cannot parse the CPU lists and onnxruntime runs
    its baseline ARM64 kernels. Returns what this call mounted."""
    done = []
    for name, cmd in (("proc", ["mount", "-t", "proc", "proc"]),):
        target = root / name
        target.mkdir(exist_ok=True)
        if any(target.iterdir()):
            continue
        sh([*cmd, target])
        done.append(target)
    return done


def run(args) -> int:
    root = args.root
    while True:
        prepare(root)
        with root_lock(root, exclusive=False) as lock:
            if (root / READY).read_text() != source_hash():
                continue     # another checkout installed its package meanwhile: reinstall
            mount_proc(root)
            try:
                return _run(args, root)
            finally:
                try:   # the last run out unmounts /proc: no other run holds the lock
                    fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
                    subprocess.run(["umount", "-R", str(root / "proc")], check=False)
                except BlockingIOError:
                    pass


def _run(args, root: Path) -> int:
    # a work folder per --out: concurrent checks (a test beside a long check) never share files,
    # and a rerun of a stopped check into the same --out resumes its benches (bench --resume)
    name = "check-" + hashlib.sha256(str(args.out.resolve()).encode()).hexdigest()[:12]
    work, inside = root / "work" / name, f"/work/{name}"
    work.mkdir(parents=True, exist_ok=True)
    with open(work / ".lock", "a") as lock:
        try:
            fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            print(f"another check into {args.out} is running", file=sys.stderr)
            return BUSY
        rc = _run_in(args, root, work, inside)
    shutil.rmtree(work, ignore_errors=True)    # kept after a failure or a stop: resumable
    return rc


def _copy_fresh(src: Path, dest: Path) -> None:
    shutil.rmtree(dest, ignore_errors=True)
    shutil.copytree(src, dest)


def _run_in(args, root: Path, work: Path, inside: str) -> int:
    _copy_fresh(args.bundle, work / "bundle")
    _copy_fresh(args.reference, work / "reference")
    shutil.rmtree(work / "data", ignore_errors=True)
    stage_boards(args.data.resolve(), args.list, args.boards, work / "data")
    out = args.out.resolve()
    out.mkdir(parents=True, exist_ok=True)
    env = {**os.environ, "PCBEDGE_ALLOW_FOREIGN_ARCH": "1", "PYTHONPATH": str(REPO)}
    x86_cmd = [sys.executable, "-m", "pcbedge", "bench", work / "bundle", "--reference",
               work / "reference", "--data", work / "data", "--list", work / "data/boards.txt",
               "--out", out / "x86", "--quiet", "--resume", *NO_LATENCY]
    rc_x86 = subprocess.run([str(c) for c in x86_cmd], env=env).returncode
    # the arm64 side answers board by board into work/out/answers (bench --resume): a stopped
    # check rerun with the same --out continues where it was; after a finished check (its work
    # folder gone) the answers it copied to OUT seed the new one, so a rebuilt bundle is checked
    # against the FP32 reference's answers already made (their keys name the model: only
    # matching ones are reused)
    seed = out / "arm64" / "answers"
    if seed.is_dir() and not (work / "out" / "answers").exists():
        shutil.copytree(seed, work / "out" / "answers")
    arm_cmd = [f"{VENV}/bin/python", "-m", "pcbedge", "bench", f"{inside}/bundle", "--reference",
               f"{inside}/reference", "--data", f"{inside}/data", "--list",
               f"{inside}/data/boards.txt", "--out", f"{inside}/out", "--resume", *NO_LATENCY]
    if args.threads:
        arm_cmd += ["--threads", str(args.threads)]
    rc_arm = chroot(root, arm_cmd, check=False).returncode
    shutil.copytree(work / "out", out / "arm64", dirs_exist_ok=True)
    (work / "probe.py").write_text(PROBE)
    subprocess.run([sys.executable, str(work / "probe.py"), work / "bundle", work / "reference",
                    work / "data", out / "probe_x86.json", str(args.bias_boards)], env=env,
                   check=True)
    chroot(root, [f"{VENV}/bin/python", f"{inside}/probe.py", f"{inside}/bundle",
                  f"{inside}/reference", f"{inside}/data", f"{inside}/probe.json",
                  str(args.bias_boards)])
    shutil.copyfile(work / "probe.json", out / "probe_arm64.json")
    return summarize(out, rc_x86, rc_arm, args)


def summarize(out: Path, rc_x86: int, rc_arm: int, args) -> int:
    rx = json.loads((out / "x86" / "report.json").read_text())
    ra = json.loads((out / "arm64" / "report.json").read_text())
    px = json.loads((out / "probe_x86.json").read_text())
    pa = json.loads((out / "probe_arm64.json").read_text())
    pred = compare_predictions(out / "x86" / "predictions.jsonl",
                               out / "arm64" / "predictions.jsonl", args.box_tol, args.conf_tol)
    every = compare_all_answers(out / "x86" / "answers" / "bundle.jsonl",
                                out / "arm64" / "answers" / "bundle.jsonl", args.box_tol,
                                args.conf_tol)
    pre_diff = max(abs(px["preprocess_sums"][k] - pa["preprocess_sums"][k])
                   for k in px["preprocess_sums"])
    keys = ("deeppcb_map", "count_exact_match", "hallucination_rate", "question_accuracy_by_kind")
    result = {
        "boards": args.boards, "answers": pred, "every_answer": every,
        "accuracy": {"x86": {k: rx["accuracy"].get(k) for k in keys},
                     "arm64": {k: ra["accuracy"].get(k) for k in keys}},
        "gates_arm64": {k: g["status"] for k, g in ra["gates"].items()},
        "gates_arm64_passed": ra["passed"], "bench_exit": {"x86": rc_x86, "arm64": rc_arm},
        "drift_arm64": {k: ra["drift"].get(k) for k in ("answer_agreement", "delta")
                        if k in ra["drift"]},
        "preprocess_max_abs_sum_diff": pre_diff,
        "residual_score_bias": {"x86": px["residual_score_bias"],
                                "arm64": pa["residual_score_bias"]},
        "emulated_latency_ms": {"note": "qemu-user emulation on x86, NOT ARM performance",
                                "p50": ra["latency_ms"].get("p50")},
        "environment_arm64": {k: ra["environment"].get(k) for k in (
            "arch", "python", "onnxruntime_version", "numpy_version", "pillow_version",
            "tokenizers_version", "torch_version", "threads")},
    }
    # preprocessing is reported, not gated: numpy/PIL may differ in the last float bits across
    # instruction sets; what must agree is the answer
    result["passed"] = bool(pred["agree"] and every["agree"] and ra["passed"])
    (out / "arm64_check.json").write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps({k: result[k] for k in ("answers", "every_answer", "accuracy",
                                             "gates_arm64_passed",
                                             "preprocess_max_abs_sum_diff", "passed")},
                     indent=2))
    print("residual score bias (logit): x86 "
          f"{px['residual_score_bias'].get('offset')}, arm64 "
          f"{pa['residual_score_bias'].get('offset')}")
    print(f"latency inside the arm64 root: qemu emulation, not ARM performance "
          f"(p50 {ra['latency_ms'].get('p50')} ms)")
    return 0 if result["passed"] else 1


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    sub = ap.add_subparsers(dest="cmd", required=True)
    p = sub.add_parser("prepare")
    p.add_argument("--root", type=Path, default=DEFAULT_ROOT)
    r = sub.add_parser("run")
    r.add_argument("--root", type=Path, default=DEFAULT_ROOT)
    r.add_argument("--bundle", type=Path, required=True)
    r.add_argument("--reference", type=Path, required=True)
    r.add_argument("--data", type=Path, required=True)
    r.add_argument("--list", type=Path, required=True)
    r.add_argument("--boards", type=int, default=50)
    r.add_argument("--out", type=Path, default=Path("arm64-out"))
    r.add_argument("--box-tol", type=float, default=1.0)
    r.add_argument("--conf-tol", type=float, default=0.02)
    r.add_argument("--no-wait", action="store_true",
                   help=f"exit {BUSY} instead of waiting when another run holds the root")
    r.add_argument("--threads", type=int, default=None,
                   help="threads of the arm64 bench (default: the bundle's)")
    r.add_argument("--bias-boards", type=int, default=12,
                   help="boards (x 8 views) the residual INT8 score bias is measured on")
    args = ap.parse_args(argv)
    if os.geteuid() != 0:
        print("error: needs root (debootstrap, binfmt, chroot)", file=sys.stderr)
        return 2
    if args.cmd == "prepare":
        prepare(args.root)
        return 0
    NO_WAIT["on"] = args.no_wait
    return run(args)


if __name__ == "__main__":
    sys.exit(main())
