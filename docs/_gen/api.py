"""The API reference: one page per module of the package, generated at build time (mkdocs-gen-files).

Walks ``pl_parablock/**/*.py`` and writes ``api/<module path>.md`` holding
``::: <module>`` (mkdocstrings renders it from the docstrings), plus
``api/SUMMARY.md``, the section's navigation (mkdocs-literate-nav). Private
modules (a name starting with ``_``, so ``_compat`` too) get no page; a
module added or split later gets one without any change here.
"""

from __future__ import annotations

from pathlib import Path

import mkdocs_gen_files

ROOT = Path(__file__).resolve().parents[2]
PACKAGE = "pl_parablock"


def modules(root: Path = ROOT) -> list[tuple[str, ...]]:
    """The public modules under ``root/pl_parablock``, as name parts (a package as itself), sorted."""
    out = []
    for path in sorted((root / PACKAGE).rglob("*.py")):
        parts = path.relative_to(root).with_suffix("").parts
        if parts[-1] == "__init__":
            parts = parts[:-1]
        elif parts[-1] == "__main__":
            continue
        if any(p.startswith("_") for p in parts):
            continue
        out.append(parts)
    return out


def main() -> None:
    """Write every module's page and the section's navigation."""
    nav = mkdocs_gen_files.Nav()
    for parts in modules():
        is_package = (ROOT.joinpath(*parts) / "__init__.py").exists()
        doc = Path("api", *parts, "index.md") if is_package else Path("api", *parts).with_suffix(".md")
        nav[parts] = doc.relative_to("api").as_posix()
        with mkdocs_gen_files.open(doc, "w") as f:
            f.write(f"::: {'.'.join(parts)}\n")
        source = Path(*parts, "__init__.py") if is_package else Path(*parts).with_suffix(".py")
        mkdocs_gen_files.set_edit_path(doc, Path("..") / source)
    with mkdocs_gen_files.open("api/SUMMARY.md", "w") as f:
        f.writelines(nav.build_literate_nav())


if __name__ in ("__main__", "<run_path>"):  # run by mkdocs-gen-files (runpy.run_path); importing it runs nothing
    main()
