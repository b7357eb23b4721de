"""Which filesystem a path lives on, from /proc/mounts: SQLite's locking is unsafe on network
filesystems (sqlite.org/lockingv3.html, "How To Corrupt Your Database Files"), where several jobs
sharing one MLflow store stall on "database is locked" or corrupt it."""

from __future__ import annotations

import os
from pathlib import Path

NETWORK = ("nfs", "nfs4", "cifs", "smb3", "smbfs", "lustre", "gpfs", "ceph", "cephfs", "glusterfs", "beegfs",
           "9p", "afs", "ocfs2", "gfs2", "wekafs", "virtiofs")  # fmt: skip
LOCAL_FUSE = ("fuse.fuse-overlayfs", "fuse.lxcfs")  # a rootless container's root, /proc views


def _unescape(field: str) -> str:
    return field.replace("\\040", " ").replace("\\011", "\t").replace("\\012", "\n").replace("\\134", "\\")


def mount_of(path: Path, mounts: str | None = None) -> tuple[str, str]:
    """(filesystem type, mount point) of the mount holding `path` (the longest mount point above it)."""
    if mounts is None:
        mounts = Path("/proc/mounts").read_text()
    p, tail = Path(os.path.abspath(path)), []
    while not p.exists() and p != p.parent:  # a store not created yet: resolve what exists of it
        tail.append(p.name)
        p = p.parent
    p = Path(os.path.realpath(p)).joinpath(*reversed(tail))
    best = ("", "/")
    for line in mounts.splitlines():
        parts = line.split()
        if len(parts) < 3:
            continue
        point, kind = _unescape(parts[1]), parts[2]
        if (p == Path(point) or Path(point) in p.parents) and len(point) >= len(best[1]):
            best = (kind, point)
    return best


def network_fs(path: Path, mounts: str | None = None) -> tuple[str, str] | None:
    """(type, mount point) when `path` is on a network or cluster filesystem, else None."""
    try:
        kind, point = mount_of(path, mounts)
    except OSError:
        return None
    if kind in NETWORK or (kind.startswith("fuse") and kind not in LOCAL_FUSE):
        return kind, point
    return None
