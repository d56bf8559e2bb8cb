"""The package's architecture rules (docs/architecture.md, "Packages and layers").

Reads every `.py` file under `keras_vmoe/` with `ast` (nothing is imported)
and checks that:

- no import cycle joins modules, nor top-level packages;
- no library module imports `keras_vmoe.cli`;
- no import points upward in the layer order;

and that every `docs/...` path cited in the code exists, with the section
heading when one is cited in quotes.

Imports count wherever they are written: at module level, inside functions
and classes, under `if`/`try`. `from a.b import c` is an import of the
module `a.b.c` when `c` is a submodule, else of `a.b`. Importing a module
also runs its parent packages' `__init__`, but that is not counted as an
edge: it would make every module depend on the root package, which imports
every subpackage to register their classes for Keras serialization.
"""

import ast
import dataclasses
import os
import re

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PACKAGE = "keras_vmoe"
PACKAGE_DIR = os.path.join(ROOT, PACKAGE)

# The layer order, top to bottom (docs/architecture.md, "Packages and
# layers"). A unit is a top-level subpackage `keras_vmoe.<pkg>` or a
# top-level module `keras_vmoe.<module>`; a unit may import units of its own
# rank or below. Units of one rank may import each other, but not in a cycle.
LAYERS = (
    ("cli",),
    ("study",),
    # The root package `keras_vmoe/__init__.py` imports every library
    # package (to register classes for serialization): only the command
    # line and the study sit above it.
    (PACKAGE,),
    ("training", "callbacks"),
    ("evaluation", "convert"),
    # A thin public re-export of models/vision_moe/layout_map.py.
    ("distribution",),
    ("models",),
    ("layers",),
    ("routers", "ot"),
    ("backend", "data", "utils"),
)
RANK = {unit: len(LAYERS) - i for i, names in enumerate(LAYERS) for unit in names}


@dataclasses.dataclass(frozen=True)
class Edge:
    """One import statement of a module of the package."""

    source: str  # importing module, e.g. "keras_vmoe.layers.moe"
    target: str  # imported module of the package
    path: str  # the importing file, relative to the repository
    line: int
    in_function: bool

    def __str__(self):
        where = "in a function" if self.in_function else "module level"
        return f"{self.source} -> {self.target}  ({self.path}:{self.line}, {where})"


def module_files():
    """`{module name: file path}` for every `.py` file of the package."""
    modules = {}
    for directory, dirnames, filenames in os.walk(PACKAGE_DIR):
        dirnames[:] = sorted(d for d in dirnames if not d.startswith((".", "__")))
        for filename in sorted(filenames):
            if not filename.endswith(".py"):
                continue
            path = os.path.join(directory, filename)
            parts = os.path.relpath(path, ROOT)[: -len(".py")].split(os.sep)
            if parts[-1] == "__init__":
                parts = parts[:-1]
            modules[".".join(parts)] = path
    return modules


MODULES = module_files()


def _is_package(module):
    return MODULES[module].endswith("__init__.py")


def _function_lines(tree):
    """The line ranges of every function body in `tree`."""
    return [
        (node.lineno, node.end_lineno)
        for node in ast.walk(tree)
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.Lambda))
    ]


def _resolve_from(module, node):
    """The absolute module name of a `from ... import` statement."""
    if not node.level:
        return node.module
    package = module if _is_package(module) else module.rpartition(".")[0]
    for _ in range(node.level - 1):
        package = package.rpartition(".")[0]
    return f"{package}.{node.module}" if node.module else package


def _in_package(name):
    return name == PACKAGE or name.startswith(PACKAGE + ".")


def _known(name):
    """`name`, or its longest prefix that is a module of the package."""
    while name and name not in MODULES:
        name = name.rpartition(".")[0]
    return name or None


def imports_of(module, source=None):
    """Every import of a package module by `module`, as `Edge`s.

    Args:
        module: str. A module of the package (a key of `MODULES`).
        source: str or None. Its source text; read from its file if None.
    """
    path = MODULES[module]
    if source is None:
        with open(path, encoding="utf-8") as f:
            source = f.read()
    tree = ast.parse(source, filename=path)
    functions = _function_lines(tree)
    relpath = os.path.relpath(path, ROOT)
    targets = []  # (target, node)
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            targets += [(alias.name, node) for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = _resolve_from(module, node)
            for alias in node.names:
                submodule = f"{base}.{alias.name}"
                targets.append((submodule if submodule in MODULES else base, node))
        elif (
            isinstance(node, ast.Call)
            and isinstance(node.func, (ast.Attribute, ast.Name))
            and getattr(node.func, "attr", getattr(node.func, "id", None))
            == "import_module"
            and node.args
            and isinstance(node.args[0], ast.Constant)
            and isinstance(node.args[0].value, str)
        ):
            # importlib.import_module("keras_vmoe.x") with a literal name.
            targets.append((node.args[0].value, node))
    edges = set()
    for name, node in targets:
        if not _in_package(name):
            continue
        target = _known(name)
        if target is None or target == module:
            continue
        in_function = any(a < node.lineno <= b for a, b in functions)
        edges.add(Edge(module, target, relpath, node.lineno, in_function))
    return edges


def all_edges():
    edges = set()
    for module in MODULES:
        edges |= imports_of(module)
    return sorted(edges, key=lambda e: (e.source, e.target, e.line))


def unit_of(module):
    """The top-level unit of `module`: `keras_vmoe.<name>` (or the root)."""
    parts = module.split(".")
    return parts[1] if len(parts) > 1 else PACKAGE


def strongly_connected_components(graph):
    """Tarjan's algorithm; `graph` maps a node to its successors."""
    index, low, on_stack, stack, components = {}, {}, set(), [], []
    counter = [0]

    def visit(node):
        index[node] = low[node] = counter[0]
        counter[0] += 1
        stack.append(node)
        on_stack.add(node)
        for succ in sorted(graph.get(node, ())):
            if succ not in index:
                visit(succ)
                low[node] = min(low[node], low[succ])
            elif succ in on_stack:
                low[node] = min(low[node], index[succ])
        if low[node] == index[node]:
            component = []
            while True:
                member = stack.pop()
                on_stack.discard(member)
                component.append(member)
                if member == node:
                    break
            components.append(sorted(component))

    for node in sorted(graph):
        if node not in index:
            visit(node)
    return components


def cycles(edges, key):
    """The import cycles among the nodes `key(module)`, with their edges.

    Returns a list of `(nodes, edges)`, one per strongly connected component
    of two nodes or more: the nodes in the cycle and the import statements
    that join them.
    """
    graph = {}
    for edge in edges:
        a, b = key(edge.source), key(edge.target)
        if a is not None and b is not None and a != b:
            graph.setdefault(a, set()).add(b)
            graph.setdefault(b, set())
    found = []
    for component in strongly_connected_components(graph):
        if len(component) < 2:
            continue
        members = set(component)
        joining = [
            e
            for e in edges
            if key(e.source) in members
            and key(e.target) in members
            and key(e.source) != key(e.target)
        ]
        found.append((component, joining))
    return found


def _report(title, cycles_found):
    lines = [title]
    for nodes, edges in cycles_found:
        lines.append(f"  cycle among {', '.join(nodes)}:")
        lines += [f"    {edge}" for edge in edges]
    return "\n".join(lines)


def test_the_walk_sees_the_whole_package():
    # Guards the test itself: modules at every level, and imports of all
    # three kinds (module level, in a function, `from a import submodule`).
    assert f"{PACKAGE}.routers.base" in MODULES
    assert f"{PACKAGE}.models.vision_moe.backbone" in MODULES
    edges = all_edges()
    assert any(e.in_function for e in edges)
    assert any(
        e.source == f"{PACKAGE}.layers.moe" and e.target.startswith(f"{PACKAGE}.")
        for e in edges
    )
    # `from keras_vmoe import backend` is an import of keras_vmoe.backend.
    assert any(e.target == f"{PACKAGE}.backend" for e in edges)


def test_the_checks_find_violations():
    # The rules themselves, on imports written for the occasion: a function-
    # level import of the command line from models, a relative import, and a
    # package cycle through them.
    source = (
        "from . import vit_layers\ndef f():\n    from keras_vmoe.cli import errors\n"
    )
    module = f"{PACKAGE}.models.vision_moe.backbone"
    edges = sorted(imports_of(module, source), key=lambda e: e.line)
    assert [(e.target, e.in_function) for e in edges] == [
        (f"{PACKAGE}.models.vision_moe.vit_layers", False),
        (f"{PACKAGE}.cli.errors", True),
    ]
    back = Edge(f"{PACKAGE}.cli.errors", module, "x.py", 1, False)
    assert cli_imports(edges + [back]) == [edges[1]]
    assert upward_imports(edges + [back]) == [edges[1]]
    assert [nodes for nodes, _ in cycles(edges + [back], key=unit_of)] == [
        ["cli", "models"]
    ]
    assert [nodes for nodes, _ in cycles(edges + [back], key=lambda m: m)] == [
        [f"{PACKAGE}.cli.errors", module]
    ]


def test_no_import_cycles_among_modules():
    found = cycles(all_edges(), key=lambda module: module)
    assert not found, _report(
        f"{len(found)} import cycle(s) among modules of {PACKAGE}:", found
    )


def test_no_import_cycles_among_packages():
    # The graph of top-level units (keras_vmoe.models, keras_vmoe.cli,
    # keras_vmoe.backend, ...): an edge for every import from a module of
    # one unit into another unit. The root package's __init__ is left out
    # (it imports every library package to register their classes).
    edges = [e for e in all_edges() if e.source != PACKAGE and e.target != PACKAGE]
    found = cycles(edges, key=unit_of)
    assert not found, _report(
        f"{len(found)} import cycle(s) among the packages of {PACKAGE}:", found
    )


def cli_imports(edges):
    """The edges from outside `keras_vmoe.cli` into it."""
    return [
        e for e in edges if unit_of(e.target) == "cli" and unit_of(e.source) != "cli"
    ]


def upward_imports(edges):
    """The edges that point up the layer order."""
    return [
        e
        for e in edges
        if RANK.get(unit_of(e.target), 0) > RANK.get(unit_of(e.source), 0)
    ]


def test_only_the_command_line_imports_cli():
    cli = f"{PACKAGE}.cli"
    offending = cli_imports(all_edges())
    assert not offending, "\n".join(
        [f"Library modules import {cli} (only {cli} may):"]
        + [f"  {e}" for e in offending]
    )


def test_every_unit_has_a_layer():
    units = {unit_of(module) for module in MODULES}
    assert units <= set(RANK), (
        f"Modules or packages missing from the layer order LAYERS (place them "
        f"in docs/architecture.md and here): {sorted(units - set(RANK))}"
    )


def test_imports_point_downward():
    offending = upward_imports(all_edges())
    order = " > ".join(", ".join(names) for names in LAYERS)
    assert not offending, "\n".join(
        [f"Imports that point upward in the layer order ({order}):"]
        + [
            f"  {e}  [{unit_of(e.source)} imports {unit_of(e.target)}]"
            for e in offending
        ]
    )


# ----------------------------------------------------------------------
# Citations of the docs.
# ----------------------------------------------------------------------
# Where citations are looked for, relative to the repository root.
CITING = ("keras_vmoe", "tests", "benchmarks", "guides", "tools", "presets", "docs")
CITING_FILES = ("README.md", "BENCHMARKS.md", "Makefile")
# `docs/<path>`, optionally followed by `, "<section heading>"`; the heading
# may run over lines (of a comment: the `#` are dropped).
CITATION = re.compile(r'(?<![\w/.-])(docs/[\w./-]*\w)(?:,[\s#]*"([^"]{1,120})")?')
SKIP_DIRS = ("ipynb", "__pycache__", "img")


def citing_files():
    for name in CITING_FILES:
        path = os.path.join(ROOT, name)
        if os.path.isfile(path):
            yield path
    for top in CITING:
        for directory, dirnames, filenames in os.walk(os.path.join(ROOT, top)):
            dirnames[:] = sorted(d for d in dirnames if d not in SKIP_DIRS)
            for filename in sorted(filenames):
                if filename.endswith((".py", ".md", ".sh", ".txt", ".toml")):
                    path = os.path.join(directory, filename)
                    if path != os.path.abspath(__file__):
                        yield path


def headings(path):
    """The text of every markdown heading of `path`."""
    found = set()
    in_fence = False
    with open(path, encoding="utf-8") as f:
        for line in f:
            if line.startswith("```"):
                in_fence = not in_fence
            match = re.match(r"(#+)\s+(.*?)\s*#*\s*$", line)
            if match and not in_fence:
                found.add(match.group(2))
    return found


def citations():
    """`(file, line, cited path, cited section or None)` for every citation."""
    for path in citing_files():
        with open(path, encoding="utf-8") as f:
            text = f.read()
        for match in CITATION.finditer(text):
            line = text.count("\n", 0, match.start()) + 1
            section = match.group(2)
            if section is not None:
                section = re.sub(r"\s*\n[\s#]*", " ", section).strip()
            yield os.path.relpath(path, ROOT), line, match.group(1), section


def test_cited_docs_and_sections_exist():
    problems = []
    count = 0
    for source, line, cited, section in citations():
        count += 1
        target = os.path.join(ROOT, cited)
        if not os.path.exists(target):
            problems.append(f"  {source}:{line}: {cited} does not exist")
        elif section is not None and os.path.isfile(target):
            if cited.endswith(".md") and section not in headings(target):
                problems.append(
                    f'  {source}:{line}: {cited} has no heading "{section}"'
                )
    assert count > 0, "found no docs/ citation at all: is the pattern broken?"
    assert not problems, "\n".join(["Citations of missing docs:"] + problems)


def test_no_citations_of_the_team_note():
    # The router specification of the project is docs/routers.md.
    problems = []
    for path in citing_files():
        if os.path.relpath(path, ROOT).startswith("docs" + os.sep):
            continue
        with open(path, encoding="utf-8") as f:
            for number, line in enumerate(f, 1):
                if "ROUTERS.md" in line:
                    problems.append(f"  {os.path.relpath(path, ROOT)}:{number}")
    assert not problems, "\n".join(
        ["Cite docs/routers.md (by section heading) instead of ROUTERS.md:"] + problems
    )


def _slug(heading):
    """GitHub's anchor of a markdown heading."""
    slug = re.sub(r"[^\w\- ]", "", heading.strip().lower())
    return slug.replace(" ", "-")


def test_links_between_docs_resolve():
    # Relative links and `#anchor`s in docs/*.md point at existing files and
    # headings.
    docs = os.path.join(ROOT, "docs")
    problems = []
    for filename in sorted(os.listdir(docs)):
        if not filename.endswith(".md"):
            continue
        path = os.path.join(docs, filename)
        with open(path, encoding="utf-8") as f:
            text = f.read()
        for target, anchor in re.findall(r"\]\(([^)#:\s]*)(?:#([^)\s]+))?\)", text):
            linked = os.path.normpath(os.path.join(docs, target)) if target else path
            if not os.path.exists(linked):
                problems.append(f"  docs/{filename}: {target} does not exist")
            elif anchor and anchor not in {_slug(h) for h in headings(linked)}:
                problems.append(f"  docs/{filename}: no heading for #{anchor}")
    assert not problems, "\n".join(["Broken links in docs/:"] + problems)
