"""The reference functions of upstream projects (plain-torch `*_ref` functions of packages that do not install
without a GPU), loaded from their pinned PyPI source archives: tritium's ops are tested against them as well as
against tritium.reference.

`upstream(project, path, name)` downloads the pinned sdist once (sha256-checked, cached under
~/.cache/tritium/upstream or $TRITIUM_UPSTREAM_CACHE), takes the function `name` out of the module at `path`
with its module's imports (ast, no import of the package, whose __init__ needs the CUDA extension) and returns
it. A machine without network and without the cache fails the tests that use it, with this module's message.
"""
from __future__ import annotations

import ast
import functools
import hashlib
import io
import os
import tarfile
import urllib.request
from pathlib import Path

# project -> (sdist URL, sha256)
PINNED = {
    "mamba-ssm": (
        "https://files.pythonhosted.org/packages/af/48/aa7bec0efc7453fa0512276c0069c854bf684219050294266534bfef34bb/"
        "mamba_ssm-2.3.2.post1.tar.gz", "104cc47e9101e5401a675fa2b784f2952b9b037f3b1dd83b5ac544394e95d028"),
    "causal-conv1d": (
        "https://files.pythonhosted.org/packages/f4/d1/eba27735f31bd5527d39a3c7f693e6ded7b844cab275db719a15ad37b6cd/"
        "causal_conv1d-1.7.0.tar.gz", "3202758494eaa7b597ce1c282dfa188889506bfcb92cad3c407d26736bfcd32b"),
}


def _cache() -> Path:
    return Path(os.environ.get("TRITIUM_UPSTREAM_CACHE", Path.home() / ".cache" / "tritium" / "upstream"))


@functools.lru_cache(maxsize=None)
def _archive(project: str) -> bytes:
    url, sha = PINNED[project]
    path = _cache() / url.rsplit("/", 1)[1]
    if not path.exists():
        try:
            data = urllib.request.urlopen(url, timeout=60).read()
        except OSError as e:
            raise RuntimeError(f"cannot download {project}'s source archive {url} ({e}); put it in {path.parent} "
                               "to run these tests offline") from e
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(data)
    data = path.read_bytes()
    if hashlib.sha256(data).hexdigest() != sha:
        raise RuntimeError(f"{path}: sha256 differs from the pinned {sha}; delete it to download it again")
    return data


@functools.lru_cache(maxsize=None)
def upstream(project: str, path: str, name: str):
    """The function `name` defined at top level in `path` (relative to the archive's root directory) of the pinned
    source archive of `project`, executed with the module's own top-level imports."""
    with tarfile.open(fileobj=io.BytesIO(_archive(project))) as tar:
        member = next(m for m in tar.getmembers() if m.name.split("/", 1)[-1] == path)
        source = tar.extractfile(member).read().decode()
    tree = ast.parse(source)
    keep = []
    for node in tree.body:
        if isinstance(node, (ast.Import, ast.ImportFrom)):
            names = [a.name for a in node.names]
            root = (node.module or names[0]).split(".")[0] if isinstance(node, ast.ImportFrom) else names[0]
            if root.split(".")[0] in ("torch", "einops", "math"):  # the ref functions need only these
                keep.append(node)
        elif isinstance(node, ast.FunctionDef) and node.name == name:
            keep.append(node)
    if not any(isinstance(n, ast.FunctionDef) for n in keep):
        raise LookupError(f"{project} {path} defines no function {name}")
    namespace: dict = {}
    exec(compile(ast.Module(body=keep, type_ignores=[]), f"{project}/{path}", "exec"), namespace)
    return namespace[name]
