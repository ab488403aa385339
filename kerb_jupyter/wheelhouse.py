"""``kerb-jupyter wheelhouse DIR``: build every wheel an offline, compiler-free install needs, once.

``pip wheel`` builds kerb_jupyter's dependencies for the Python running it (krb5 and gssapi compile here,
once: the package index has no Linux wheels for them) and copies the rest; from a source checkout it also builds
the optional COPY reader extension ``kerb_jupyter_copy`` (``copyreader/``, C, seconds). Install on the notebook
with ``pip install --no-index --find-links DIR --only-binary=krb5,gssapi,psycopg-binary,kerb_jupyter_copy
kerb_jupyter kerb_jupyter_copy``.
Run it with each target Python (3.10 for notebook instances, 3.11/3.12 for Studio) on a system whose glibc
is not newer than the target's (build in an ``amazonlinux:2023`` container for notebook instances).
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

from . import __version__
from .core.errors import ConfigError

COMPILED = ("krb5", "gssapi")
COPY_READER = "kerb_jupyter_copy"


def copy_reader_source(spec: str) -> Path | None:
    """The COPY reader's source folder when ``spec`` is a source checkout holding one."""
    folder = Path(spec) / "copyreader"
    return folder if (folder / "pyproject.toml").is_file() else None


def default_spec() -> str:
    """This source checkout when run from one, else the released version of the running package."""
    root = Path(__file__).resolve().parent.parent
    if (root / "pyproject.toml").is_file():
        return str(root)
    return f"kerb_jupyter=={__version__}"


def build_wheelhouse(target: Path, spec: str | None = None, python: str = sys.executable) -> list[Path]:
    """Fill ``target`` with wheels for ``spec`` and its dependencies. Raises ConfigError when pip fails."""
    target.mkdir(parents=True, exist_ok=True)
    spec = spec or default_spec()
    print(f"kerb-jupyter wheelhouse: building {spec} for {sys.version.split()[0]} into {target} "
          "(krb5 and gssapi compile once if no wheel is cached: ~2 min)", file=sys.stderr, flush=True)
    reader = copy_reader_source(spec)
    for what in [spec] + ([str(reader)] if reader else []):
        done = subprocess.run([python, "-m", "pip", "wheel", "-q", "--disable-pip-version-check", "--wheel-dir",
                               str(target), what], check=False)
        if done.returncode != 0:
            raise ConfigError(f"pip wheel {what} failed (exit {done.returncode}); see pip's output above "
                              "(compiling krb5, gssapi and the COPY reader needs gcc, Python headers and krb5-config)")
    wheels = sorted(target.glob("*.whl"))
    for name in COMPILED + ((COPY_READER,) if reader else ()):
        built = [w.name for w in wheels if w.name.lower().startswith(f"{name}-")]
        if not built:
            raise ConfigError(f"the wheelhouse {target} has no {name} wheel")
        print(f"kerb-jupyter wheelhouse: {', '.join(built)}", file=sys.stderr)
    print(f"kerb-jupyter wheelhouse: {len(wheels)} wheels in {target}", file=sys.stderr)
    return wheels
