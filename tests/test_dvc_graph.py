"""The DVC graph lists every file of code a stage runs.

A stage's code is the import closure of the module its `mockingjay <subcommand>` command runs,
restricted to this repository's packages (`stages/`, `mockingjay/`). The closure is computed
statically with `ast`, counting imports inside functions too: the stages import lazily (torch,
the model, the figures), so a module-level-only scan would miss most of what they run. A file of
the closure missing from the stage's deps means editing it leaves stale outputs while
`dvc status` says up to date (issue 12: figures.py and reports/probe/*.png).
"""

from __future__ import annotations

import ast
import os
import shlex
import textwrap
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = ("stages", "mockingjay")


def module_file(root: Path, module: str) -> Path | None:
    """The file a dotted module name resolves to inside root, or None (not ours, or not a module)."""
    parts = module.split(".")
    if parts[0] not in PACKAGES:
        return None
    base = root.joinpath(*parts)
    for candidate in (base.with_suffix(".py"), base / "__init__.py"):
        if candidate.is_file():
            return candidate
    return None


def imported_modules(path: Path, module: str) -> set[str]:
    """Every module an import statement anywhere in the file names (module level, functions, branches)."""
    is_package = path.name == "__init__.py"
    package = module if is_package else module.rpartition(".")[0]
    names: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(), filename=str(path))):
        if isinstance(node, ast.Import):
            for alias in node.names:
                parts = alias.name.split(".")
                # `import a.b.c` executes a, a.b and a.b.c
                names.update(".".join(parts[: i + 1]) for i in range(len(parts)))
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                anchor = package.split(".")
                anchor = anchor[: len(anchor) - (node.level - 1)]
                base = ".".join(anchor + ([node.module] if node.module else []))
            else:
                base = node.module or ""
            parts = base.split(".")
            names.update(".".join(parts[: i + 1]) for i in range(len(parts)))
            # `from pkg import name`: name may be a submodule
            names.update(f"{base}.{alias.name}" for alias in node.names if alias.name != "*")
    return names


def is_marker(path: Path) -> bool:
    """An empty package __init__ (only a docstring, or nothing) runs no code worth a dep."""
    if path.name != "__init__.py":
        return False
    body = ast.parse(path.read_text()).body
    return all(isinstance(n, ast.Expr) and isinstance(n.value, ast.Constant) for n in body)


def import_closure(root: Path, module: str) -> set[Path]:
    """Files (inside root's packages) that importing `module` can execute, itself included."""
    seen: set[Path] = set()
    todo = [module]
    while todo:
        name = todo.pop()
        path = module_file(root, name)
        if path is None or path in seen:
            continue
        seen.add(path)
        todo.extend(imported_modules(path, name))
    return {p for p in seen if not is_marker(p)}


def subcommand_modules(root: Path) -> dict[str, str]:
    """`mockingjay` subcommand -> module of its function, read from stages/cli.py's app.command(...) calls."""
    tree = ast.parse((root / "stages" / "cli.py").read_text())
    aliases: dict[str, str] = {}
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom) and node.level == 1 and node.module is None:
            aliases.update({a.asname or a.name: f"stages.{a.name}" for a in node.names})
    mapping: dict[str, str] = {}
    for node in ast.walk(tree):
        # app.command("name")(module.function)
        if (
            isinstance(node, ast.Call)
            and isinstance(node.func, ast.Call)
            and isinstance(node.func.func, ast.Attribute)
            and node.func.func.attr == "command"
            and node.func.args
            and isinstance(node.func.args[0], ast.Constant)
            and node.args
            and isinstance(node.args[0], ast.Attribute)
            and isinstance(node.args[0].value, ast.Name)
        ):
            mapping[node.func.args[0].value] = aliases[node.args[0].value.id]
    return mapping


def stage_subcommands(cmd: str | list[str]) -> list[str]:
    """The subcommands of every `mockingjay <subcommand>` invocation in a stage's cmd."""
    found = []
    for line in [cmd] if isinstance(cmd, str) else cmd:
        words = shlex.split(line)
        found.extend(
            words[i + 1] for i, w in enumerate(words[:-1]) if os.path.basename(w) == "mockingjay"
        )
    return found


def missing_deps(root: Path, dvc_yaml: Path) -> dict[str, list[str]]:
    """Stage name -> closure files (repository-relative) that the stage's deps do not cover."""
    commands = subcommand_modules(root)
    stages = yaml.safe_load(dvc_yaml.read_text()).get("stages", {})
    missing: dict[str, list[str]] = {}
    for name, stage in stages.items():
        stage = stage.get("do", stage)  # foreach/matrix stages keep cmd and deps under `do`
        # deps are relative to the dvc.yaml's own folder (studies/<name>/dvc.yaml: ../../stages/x.py)
        deps = [Path(os.path.normpath(dvc_yaml.parent / d)) for d in stage.get("deps", [])]
        need: set[Path] = set()
        for sub in stage_subcommands(stage.get("cmd", "")):
            assert sub in commands, (
                f"{dvc_yaml}: stage {name} runs `mockingjay {sub}`, which stages/cli.py does not define"
            )
            need |= import_closure(root, commands[sub])
        lost = sorted(
            str(f.relative_to(root))
            for f in need
            if not any(f == d or d in f.parents for d in deps)
        )
        if lost:
            missing[name] = lost
    return missing


def dvc_files(root: Path) -> list[Path]:
    return [p for p in [root / "dvc.yaml", *sorted(root.glob("studies/*/dvc.yaml"))] if p.is_file()]


@pytest.mark.parametrize("dvc_yaml", dvc_files(ROOT), ids=lambda p: str(p.relative_to(ROOT)))
def test_stage_deps_cover_their_import_closure(dvc_yaml: Path) -> None:
    missing = missing_deps(ROOT, dvc_yaml)
    report = "\n".join(f"  {stage}: {', '.join(files)}" for stage, files in missing.items())
    assert not missing, (
        f"{dvc_yaml.relative_to(ROOT)}: stages miss deps on code they import:\n{report}"
    )


def test_every_subcommand_stage_is_checked() -> None:
    # Guards the checker itself: if cli.py's registration changed shape, the mapping would come
    # back empty and every stage would pass vacuously.
    stages = yaml.safe_load((ROOT / "dvc.yaml").read_text())["stages"]
    commands = subcommand_modules(ROOT)
    for name, stage in stages.items():
        subs = stage_subcommands(stage["cmd"])
        assert subs and all(s in commands for s in subs), name
    assert commands["probe"] == "stages.probe"


def test_closure_follows_lazy_and_relative_imports() -> None:
    closure = {str(p.relative_to(ROOT)) for p in import_closure(ROOT, "stages.probe")}
    # figures.py is imported only inside a function, stages/runtime.py relatively, checkpoint.py
    # through mockingjay.probe_online -> mockingjay.extract's lazy imports or the stage itself.
    assert {
        "stages/probe.py",
        "stages/runtime.py",
        "stages/common.py",
        "stages/tracking.py",
        "mockingjay/figures.py",
        "mockingjay/config.py",
        "mockingjay/checkpoint.py",
    } <= closure
    assert (
        "stages/pretrain.py" not in closure and "stages/extract.py" not in closure
    )  # no stage-to-stage import


def _fake_repo(root: Path, dvc_yaml: str, where: str = "dvc.yaml") -> Path:
    (root / "stages").mkdir()
    (root / "mockingjay").mkdir()
    (root / "stages" / "__init__.py").write_text("")
    (root / "mockingjay" / "__init__.py").write_text('"""Package."""\n')
    (root / "stages" / "cli.py").write_text(
        textwrap.dedent("""\
        from . import work
        app.command("work")(work.main)
        """)
    )
    (root / "stages" / "work.py").write_text(
        textwrap.dedent("""\
        from .helper import x
        def main():
            from mockingjay import plots
            import mockingjay.lazy
        """)
    )
    for name in (
        "stages/helper.py",
        "mockingjay/plots.py",
        "mockingjay/lazy.py",
        "mockingjay/unused.py",
    ):
        (root / name).write_text("import os\n")
    path = root / where
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(textwrap.dedent(dvc_yaml))
    return path


def test_missing_deps_names_each_missing_file(tmp_path: Path) -> None:
    dvc_yaml = _fake_repo(
        tmp_path,
        """\
        stages:
          work:
            cmd: mockingjay work --out x
            deps: [stages/work.py, mockingjay/plots.py]
        """,
    )
    assert missing_deps(tmp_path, dvc_yaml) == {"work": ["mockingjay/lazy.py", "stages/helper.py"]}


def test_missing_deps_resolves_a_study_folder_and_directory_deps(tmp_path: Path) -> None:
    dvc_yaml = _fake_repo(
        tmp_path,
        """\
        stages:
          work:
            cmd: >-
              mockingjay work
              --out x
            deps: [../../stages, ../../mockingjay/plots.py]
        """,
        where="studies/one/dvc.yaml",
    )
    assert missing_deps(tmp_path, dvc_yaml) == {"work": ["mockingjay/lazy.py"]}
    assert dvc_files(tmp_path) == [dvc_yaml]
