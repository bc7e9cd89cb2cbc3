"""Shared-memory segments: creation (owner-only, named after the owning process), attaching without
the resource tracker, the lifetime shared by the ring, the weight store and the trainer status,
cleanup on signals, and a sweep of segments whose owner died without cleaning up (SIGKILL)."""

from __future__ import annotations

import atexit
import logging
import mmap
import os
import re
import secrets
import shutil
import signal
import tempfile
from multiprocessing.shared_memory import SharedMemory
from typing import Any, Protocol

log = logging.getLogger("aurora_sgl.transport")

SHM_DIR = "/dev/shm"
ALIGN = 64
_NAME = re.compile(r"[A-Za-z0-9_-]{1,200}\Z")
# What this project creates: <prefix>_<owner pid>_<12 hex> in /dev/shm (SGLang DP replica d >= 1's
# ring: aurora_ring_dp<d>_...), and the trainer handoff's directory <prefix>_<owner pid>_<random>
# in the temp dir (the SGLang backend's is aurora_sgl_...).
_OWNED = re.compile(r"(aurora_ring(?:_dp\d+)?|aurora_weights|aurora_trainer|aurora_sgl)_(\d+)_[A-Za-z0-9_]+\Z")


def align_up(n: int, to: int = ALIGN) -> int:
    return (n + to - 1) // to * to


def create_segment(name_prefix: str, nbytes: int) -> SharedMemory:
    """A new zero-filled segment named <prefix>_<pid>_<random hex>, readable by this user only."""
    if not isinstance(name_prefix, str) or not _NAME.match(name_prefix):
        raise ValueError(f"name_prefix must be 1-200 characters from [A-Za-z0-9_-], got {name_prefix!r}")
    shm = SharedMemory(name=f"{name_prefix}_{os.getpid()}_{secrets.token_hex(6)}", create=True, size=nbytes)
    # SharedMemory asks for 0600 today, but that is an implementation detail: the segment carries
    # hidden states of users' requests and the weights the engine will run, so pin it.
    os.chmod(os.path.join(SHM_DIR, shm.name), 0o600)
    return shm


class AttachedSegment:
    """An existing segment mapped without the resource tracker.

    `SharedMemory(name)` on Python < 3.13 registers the segment with the resource tracker, which
    then unlinks it when the reader exits. Unregistering afterwards is wrong too: processes started
    by multiprocessing share their parent's tracker, which keeps one set entry per name, so the
    reader's unregister would also erase the creator's registration (the creator's own unlink then
    raises KeyError inside the tracker, and a crashed creator's segment is no longer reclaimed).
    Mapping the file directly leaves all tracking to the creator."""

    def __init__(self, name: str):
        if not isinstance(name, str) or not _NAME.match(name):
            raise ValueError(f"not a segment name: {name!r}")
        fd = os.open(os.path.join(SHM_DIR, name), os.O_RDWR)
        try:
            self._mmap = mmap.mmap(fd, os.fstat(fd).st_size)
        finally:
            os.close(fd)
        self.name = name
        self.buf = memoryview(self._mmap)

    def close(self) -> None:
        self.buf.release()
        self._mmap.close()


class SharedSegment:
    """Lifetime shared by the ring, the weight store and the trainer status: the creator owns the
    segment's name and removes it; every process maps it; views into the mapping must be dropped
    (`_drop_views`) before the mapping can close. Subclasses set `_seg`, `_spec` and `_owns_name`."""

    _seg: SharedMemory | AttachedSegment
    _spec: dict
    _owns_name: bool
    _unlinked: bool = False

    @property
    def name(self) -> str:
        return self._spec["name"]

    def spec(self) -> dict:
        """What another process passes to `attach`."""
        return dict(self._spec)

    def unlink(self) -> None:
        """Remove the segment's name (creator only; idempotent). Mappings stay valid until closed."""
        if self._owns_name and not self._unlinked:
            self._unlinked = True
            try:
                self._seg.unlink()
            except FileNotFoundError:
                pass

    def _drop_views(self) -> None:
        raise TypeError(f"{type(self).__name__} must say which views to drop before closing")

    def close(self) -> None:
        """Drop this process's mapping; the creator also unlinks."""
        self.unlink()
        self._drop_views()
        self._seg.close()


class _Unlinkable(Protocol):
    def unlink(self) -> None: ...


def cleanup_on_signals(owner: _Unlinkable) -> None:
    """Unlink `owner`'s segment at interpreter exit and on SIGTERM / SIGINT (main thread only).

    The previous handler still runs afterwards: a Python handler is called, SIG_IGN stays ignored,
    and the default action is restored and the signal re-raised so the process dies of it as it
    would have (exit status -SIGTERM, not a silent survival)."""
    atexit.register(owner.unlink)
    for sig in (signal.SIGTERM, signal.SIGINT):
        previous = signal.getsignal(sig)

        def handler(signum: int, frame: Any, previous: Any = previous) -> None:
            owner.unlink()
            if callable(previous):
                previous(signum, frame)
            elif previous != signal.SIG_IGN:
                signal.signal(signum, signal.SIG_DFL)
                os.kill(os.getpid(), signum)

        signal.signal(sig, handler)


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's process: alive, and not ours to sweep
        return True
    return True


def sweep_stale(shm_dir: str = SHM_DIR, tmp_dir: str | None = None) -> list[str]:
    """Remove this project's segments and handoff directories whose owner process is gone (a server
    killed with SIGKILL never runs its cleanup). Returns what was removed. Only names this project
    creates are touched, and only when the pid in the name no longer exists."""
    removed = []
    for root, is_dir in ((shm_dir, False), (tmp_dir or tempfile.gettempdir(), True)):
        try:
            names = os.listdir(root)
        except OSError:
            continue
        for name in names:
            m = _OWNED.match(name)
            if not m or _pid_alive(int(m.group(2))):
                continue
            path = os.path.join(root, name)
            try:
                if is_dir:
                    if os.path.isdir(path) and os.stat(path).st_uid == os.getuid():
                        shutil.rmtree(path)
                        removed.append(path)
                elif os.stat(path).st_uid == os.getuid():
                    os.unlink(path)
                    removed.append(path)
            except OSError:
                continue
    if removed:
        log.warning(
            "removed %d shared-memory segments and directories left by dead servers: %s",
            len(removed),
            ", ".join(os.path.basename(p) for p in removed),
        )
    return removed
