"""Where a statement comes from: the notebook (relative to the server's root), the kernel, and the tag comment
that carries them with the principal and AWS identity into the database's log."""

from __future__ import annotations

import functools
import os

from ..core.tagging import build_comment


@functools.lru_cache(maxsize=64)
def tag_comment(principal: str, aws_identity: str | None, notebook: str | None) -> str:
    return build_comment({"app": "kerb_jupyter", "principal": principal, "aws_identity": aws_identity,
                          "notebook": notebook, "kernel": kernel_id()})


@functools.lru_cache(maxsize=16)
def notebook_path(session_name: str | None, root_dir: str | None) -> str | None:
    """The notebook's path relative to the server's root_dir, never the server's own file-system path.

    Jupyter gives kernels ``JPY_SESSION_NAME`` as an absolute path; the kerb_jupyter server extension exports
    its root_dir as ``KERB_JUPYTER_ROOT_DIR``. A path outside the root (or an unknown root) gives only the
    file name; no session name (a kernel without a notebook) gives nothing."""
    if not session_name:
        return None
    if not os.path.isabs(session_name):
        return session_name.replace(os.sep, "/")
    if root_dir and os.path.isabs(root_dir):
        for name, root in ((session_name, root_dir), (os.path.realpath(session_name), os.path.realpath(root_dir))):
            rel = os.path.relpath(name, root)
            if rel != ".." and not rel.startswith(".." + os.sep):
                return rel.replace(os.sep, "/")
    return os.path.basename(session_name) or None


@functools.cache
def kernel_id() -> str | None:
    try:
        from ipykernel import get_connection_file
    except ImportError:
        return None
    try:
        name = os.path.basename(get_connection_file())
    except (RuntimeError, AttributeError):
        return None
    return name.removeprefix("kernel-").removesuffix(".json")
