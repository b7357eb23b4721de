"""The code's shape, held by the code: layers that import only downwards, no cycles, one owner per
external system, no private names across packages, every module named by a string or path real, and
docs/architecture.md listing exactly the modules on disk."""

from __future__ import annotations

import ast
import importlib.util
import re
import sys
from importlib.metadata import packages_distributions
from pathlib import Path

import pytest
from helpers.launch import ROOT

PKG = ROOT / "ffscale"
# Lowest first. A module may import its own layer and any layer below it, never one above.
LAYERS = [
    ("ffscale", "ffscale.errors", "ffscale.util"),
    ("ffscale.models",),
    ("ffscale.config",),
    ("ffscale.data",),
    ("ffscale.data.ingest",),
    ("ffscale.engine",),
    ("ffscale.inference",),
    ("ffscale.tracking",),
    ("ffscale.run",),
    ("ffscale.tools",),
    ("ffscale.cli", "ffscale.train"),
]
OWNERS = {"deepspeed": "ffscale.engine", "nvidia.dali": "ffscale.data", "webdataset": "ffscale.data",
          "mlflow": "ffscale.tracking", "fsspec": "ffscale.data.remote", "s3fs": "ffscale.data.remote",
          "gcsfs": "ffscale.data.remote"}  # fmt: skip


def module_name(path: Path) -> str:
    parts = list(path.relative_to(ROOT).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


MODULES = {module_name(p): p for p in sorted(PKG.rglob("*.py"))}


def layer(mod: str) -> int:
    best = max((p for names in LAYERS for p in names if mod == p or mod.startswith(p + ".")), key=len)
    return next(i for i, names in enumerate(LAYERS) if best in names)


def imports(path: Path) -> list[tuple[str, list[str], int]]:
    """(module, names, line) of every import in the file, at module level or inside functions."""
    out = []
    pkg = module_name(path) if path.name == "__init__.py" else module_name(path).rsplit(".", 1)[0]
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            out += [(a.name, [], node.lineno) for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                up = pkg.split(".")[: len(pkg.split(".")) - node.level + 1]
                base = ".".join(up + ([base] if base else []))
            out.append((base, [a.name for a in node.names], node.lineno))
    return out


def ffscale_targets(mod: str, names: list[str]) -> list[str]:
    """The ffscale modules an import statement reaches (`from ffscale.x import y` may name module y)."""
    if not mod.startswith("ffscale"):
        return []
    subs = [f"{mod}.{n}" for n in names if f"{mod}.{n}" in MODULES]
    return [*subs, mod]  # importing a submodule runs its package's __init__.py too


GRAPH = {
    m: {t for mod, names, _ in imports(p) for t in ffscale_targets(mod, names) if t != m}
    for m, p in MODULES.items()
}


def test_every_module_sits_in_a_layer():
    for m in MODULES:
        assert layer(m) >= 0, m


def test_imports_point_down_the_layers():
    up = [
        f"{MODULES[m].relative_to(ROOT)}:{line} imports {t}"
        for m, p in MODULES.items()
        for mod, names, line in imports(p)
        for t in ffscale_targets(mod, names)
        if layer(t) > layer(m)
    ]
    assert not up, "\n".join(up)


def test_no_import_cycles():
    seen, stack, cycles = set(), [], []

    def visit(m):
        if m in stack:
            cycles.append(stack[stack.index(m) :] + [m])
            return
        if m in seen:
            return
        seen.add(m)
        stack.append(m)
        for t in sorted(GRAPH.get(m, ())):
            if t in MODULES:
                visit(t)
        stack.pop()

    for m in sorted(MODULES):
        visit(m)
    assert not cycles, "\n".join(" -> ".join(c) for c in cycles)


def test_each_external_system_has_one_owner():
    wrong = [
        f"{p.relative_to(ROOT)}:{line} imports {mod}"
        for m, p in MODULES.items()
        for mod, _, line in imports(p)
        for system, owner in OWNERS.items()
        if (mod == system or mod.startswith(system + ".")) and not (m == owner or m.startswith(owner + "."))
    ]
    assert not wrong, "\n".join(wrong)


def test_nobody_imports_another_packages_private_names():
    def package(m):
        return m if MODULES[m].name == "__init__.py" else m.rsplit(".", 1)[0]

    wrong = [
        f"{p.relative_to(ROOT)}:{line} takes {n} from {mod}"
        for m, p in MODULES.items()
        for mod, names, line in imports(p)
        if mod.startswith("ffscale") and mod in MODULES and package(mod) != package(m)
        for n in names
        if n.startswith("_")
    ]
    assert not wrong, "\n".join(wrong)


def test_nothing_in_the_package_folder_shadows_a_module_train_py_imports():
    """`deepspeed ffscale/train.py` puts ffscale/ first on sys.path: a top-level name there that is also
    a stdlib or installed module would replace it in every rank."""
    installed = set(sys.stdlib_module_names) | set(packages_distributions())
    ours = {p.stem for p in PKG.glob("*.py")} | {
        p.name for p in PKG.iterdir() if (p / "__init__.py").is_file()
    }
    assert not ours & installed, ours & installed


TEXT_FILES = [
    *ROOT.glob("*.md"), *(ROOT / "docs").glob("*.md"), *(ROOT / "scripts").glob("*.sh"), *(ROOT / "cluster").rglob("*"),
    ROOT / "Dockerfile", ROOT / "pyproject.toml", *(ROOT / "configs").glob("*.yaml"), *PKG.rglob("*.py"),
]  # fmt: skip


def texts():
    return [(p, p.read_text()) for p in TEXT_FILES if p.is_file()]


def test_every_module_named_by_a_string_exists():
    """`python -m ffscale.x`, `ffscale.x:main` and `ffscale/x.py` in scripts, docs, configs and code."""
    missing = []
    for path, text in texts():
        for mod in re.findall(r"-m (ffscale(?:\.\w+)+)|(ffscale(?:\.\w+)*):\w+", text):
            name = mod[0] or mod[1]
            if importlib.util.find_spec(name) is None:
                missing.append(f"{path.relative_to(ROOT)}: {name}")
        for rel in re.findall(r"\b(ffscale/[\w/]+\.py)\b", text):
            if not (ROOT / rel).is_file():
                missing.append(f"{path.relative_to(ROOT)}: {rel}")
    assert not missing, "\n".join(missing)


def test_every_test_the_docs_name_exists():
    tests = {p.relative_to(ROOT).as_posix(): p.read_text() for p in (ROOT / "tests").rglob("*.py")}
    missing = []
    for path, text in texts():
        for rel, name in re.findall(r"`(tests/[\w/]+\.py)(?:::(test_\w+))?", text):
            if rel not in tests or (name and f"def {name}(" not in tests[rel]):
                missing.append(f"{path.relative_to(ROOT)}: {rel}::{name}")
        for name in re.findall(r"`::(test_\w+)`", text):
            if not any(f"def {name}(" in t for t in tests.values()):
                missing.append(f"{path.relative_to(ROOT)}: ::{name}")
    assert not missing, "\n".join(missing)


def architecture_modules() -> set[str]:
    """Module paths in the architecture doc's tree: an indented `name/` opens a folder."""
    text = (ROOT / "docs" / "architecture.md").read_text()
    block = text[text.index("```\nffscale/") + 4 :]
    block = block[: block.index("```")]
    found, stack = set(), []
    for line in block.splitlines():
        if not line.strip():
            continue
        depth = (len(line) - len(line.lstrip())) // 2
        name = line.split()[0]
        stack = stack[:depth]
        if name.endswith("/"):
            stack.append(name.rstrip("/"))
        elif name.endswith(".py"):
            found.add("/".join([*stack, name]))
    return found


def listed_modules() -> set[str]:
    """Every module on disk, but package faces that hold only a docstring."""
    out = set()
    for p in PKG.rglob("*.py"):
        body = ast.parse(p.read_text()).body
        if p.name == "__init__.py" and all(isinstance(n, ast.Expr) for n in body):
            continue
        out.add(p.relative_to(ROOT).as_posix())
    return out


def test_the_architecture_doc_lists_exactly_the_modules_on_disk():
    doc, disk = architecture_modules(), listed_modules()
    assert doc == disk, f"only in the doc: {sorted(doc - disk)}; only on disk: {sorted(disk - doc)}"


def test_ffscale_help_lists_every_command_on_one_line_each(monkeypatch, capsys):
    from ffscale.cli import build_parser

    monkeypatch.setenv("COLUMNS", "100")
    parser = build_parser()
    sub = next(a for a in parser._actions if a.__class__.__name__ == "_SubParsersAction")
    with pytest.raises(SystemExit):
        parser.parse_args(["--help"])
    out = capsys.readouterr().out
    listed = [ln.split()[0] for ln in out.splitlines() if ln.startswith("    ") and ln.strip()]
    assert listed == list(sub.choices), out
    assert all(a.help for a in sub._choices_actions), [a.dest for a in sub._choices_actions if not a.help]


def test_no_dated_figure_in_the_code():
    """Figures live in docs/results/ with their command, commit, date and machine; the code says why
    and cites where, never a date or a measured ratio that rots. A config may state its expected
    result with the commit that recorded it, as big_vision's configs do, not a date."""
    import re

    date = re.compile(r"\b20\d\d-[01]\d-[0-3]\d\b")
    ratio = re.compile(r"\b\d+\.\d\dx\b")  # a measured speed ratio such as "1.12x"
    root = Path(__file__).resolve().parents[2]
    found = [
        f"{path.relative_to(root)}:{n}: {line.strip()}"
        for path in sorted((root / "ffscale").rglob("*.py"))
        for n, line in enumerate(path.read_text().splitlines(), 1)
        if date.search(line) or ratio.search(line)
    ]
    found += [
        f"{path.relative_to(root)}:{n}: {line.strip()}"
        for path in sorted((root / "configs").glob("*.yaml"))
        for n, line in enumerate(path.read_text().splitlines(), 1)
        if date.search(line)
    ]
    assert not found, "\n".join(found)
