"""Install what `make` needs into the current interpreter's environment, once.

* A torch that is already installed (a CUDA build on a GPU box, say) is kept:
  the ``torch==`` line of requirements.txt is only used when ``import torch``
  fails, and so is the ``torchvision==`` line (that wheel pins its torch).
* Everything else in requirements.txt, and the ``ensembling`` package itself
  (editable), is installed with pip.
* A stamp file records the digest of requirements.txt and pyproject.toml for
  this interpreter; while it matches, nothing is run (a make call costs ~0 s).
"""

from __future__ import annotations

import compileall
import concurrent.futures
import hashlib
import importlib.metadata
import importlib.util
import json
import shutil
import subprocess
import sys
import sysconfig
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
REQUIREMENTS = ROOT / "requirements.txt"
STAMP_DIR = ROOT / ".make"


def digest() -> str:
    h = hashlib.sha256(sys.prefix.encode())
    for path in (REQUIREMENTS, ROOT / "pyproject.toml"):
        h.update(path.read_bytes())
    return h.hexdigest()[:16]


def requirement_lines(keep_torch: bool) -> list[str]:
    lines = []
    for raw in REQUIREMENTS.read_text().splitlines():
        line = raw.split("#", 1)[0].strip()
        if not line:
            continue
        name = line.split("=")[0].split("<")[0].split(">")[0].split("[")[0].strip().lower()
        # torchvision's wheel pins the torch it was built for: installing it beside
        # a torch that is kept would replace that torch. The zoo tests skip without it.
        if name in ("torch", "torchvision") and not keep_torch:
            continue
        lines.append(line)
    return lines


def pip(*args: str) -> None:
    """pip install ``args``, then compile the bytecode of what it installed, on every core.

    Bytecode is needed: where PYTHONDONTWRITEBYTECODE is set, as on this
    project's machines, Python never caches what it compiles on import, and
    without .pyc files every process (test subprocesses, notebook kernels,
    distributed ranks) compiles torch from source again (`.ci/run`'s tests took
    67 s longer). pip compiles on one core (58 of the 130 s that requirements.txt
    takes on a 2-core machine); compileall over the folders that hold the
    installed files uses them all, and leaves the environment's other folders
    alone (a folder shared with another package, such as site-packages itself
    for an editable install's finder, gets all of its .py files compiled).
    """
    with tempfile.TemporaryDirectory() as tmp:
        report = Path(tmp) / "report.json"
        cmd = [sys.executable, "-m", "pip", "install", "--disable-pip-version-check", "--no-compile"]
        cmd += ["--report", str(report), *args]
        print("+", " ".join(cmd), flush=True)
        subprocess.run(cmd, check=True)
        names = [item["metadata"]["name"] for item in json.loads(report.read_text())["install"]]
    compile_installed(names)


def compile_installed(names: list[str]) -> None:
    """Write the .pyc files of the installed distributions ``names``, in parallel."""
    importlib.invalidate_caches()
    folders: set[Path] = set()
    for name in names:
        dist = importlib.metadata.distribution(name)
        for file in dist.files or []:
            if file.suffix == ".py" and not file.parts[0].endswith((".dist-info", ".data")) and ".." not in file.parts:
                folders.add(Path(dist.locate_file(file)).parent)
    started = time.monotonic()
    # compile_dir with maxlevels=0 compiles one folder's own files; the pool spreads the folders.
    with concurrent.futures.ProcessPoolExecutor() as pool:
        list(pool.map(_compile_folder, sorted(folders), chunksize=16))
    print(f"compiled the bytecode of {len(names)} distributions in {time.monotonic() - started:.0f} s", flush=True)


def _compile_folder(folder: Path) -> bool:
    return compileall.compile_dir(folder, maxlevels=0, quiet=2)


def repair_torchvision() -> None:
    """Install tools/torchvision_shim.py when a CUDA torchvision cannot import beside this CPU torch."""
    probe = subprocess.run([sys.executable, "-c", "import torchvision"], capture_output=True, text=True, check=False)
    if probe.returncode == 0 or "torchvision::nms does not exist" not in probe.stderr:
        return
    site = Path(sysconfig.get_paths()["purelib"])
    shutil.copyfile(ROOT / "tools" / "torchvision_shim.py", site / "_ensembling_torchvision_shim.py")
    (site / "_ensembling_torchvision_shim.pth").write_text(
        "import _ensembling_torchvision_shim; _ensembling_torchvision_shim.install()\n"
    )
    print("installed tools/torchvision_shim.py: the CUDA torchvision wheel now imports beside the CPU torch")


def main() -> int:
    stamp = STAMP_DIR / f"deps-{digest()}"
    if stamp.exists() and importlib.util.find_spec("ensembling") is not None:
        return 0
    have_torch = importlib.util.find_spec("torch") is not None
    if have_torch:
        import torch

        print(f"keeping the installed torch {torch.__version__} (requirements.txt's torch pin is skipped)")
    with tempfile.NamedTemporaryFile("w", suffix=".txt", delete=False) as handle:
        handle.write("\n".join(requirement_lines(keep_torch=not have_torch)) + "\n")
    try:
        pip("-r", handle.name)
    finally:
        Path(handle.name).unlink()
    pip("--no-deps", "-e", str(ROOT))
    repair_torchvision()
    STAMP_DIR.mkdir(exist_ok=True)
    for old in STAMP_DIR.glob("deps-*"):
        old.unlink()
    stamp.touch()
    return 0


if __name__ == "__main__":
    sys.exit(main())
