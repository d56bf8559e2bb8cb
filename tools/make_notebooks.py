"""Turns every guide `guides/<name>.py` into a Colab notebook.

    python tools/make_notebooks.py           # (re)write guides/ipynb/*.ipynb
    python tools/make_notebooks.py --check   # exit 1 if a notebook is stale

A guide is a Python script in the keras.io format: a docstring header with
`Title:`, `Author:`, `Date created:`, `Last modified:`, `Description:` and
`Accelerator:` lines, then markdown cells written as triple-quoted strings
that start at the beginning of a line, and code between them. The notebook
gets:

- the header as its first markdown cell (title, author, dates, description);
- a first code cell that installs keras_vmoe (`!pip install -q keras-vmoe`);
- one markdown cell per triple-quoted string and one code cell per stretch
  of code between them;
- Colab metadata, and `"accelerator": "GPU"` when the guide asks for one.

The notebooks are generated files: edit the guide, then run this script
(`make notebooks`). The tests check that every notebook matches its guide.
"""

import argparse
import pathlib
import sys

import nbformat

ROOT = pathlib.Path(__file__).resolve().parent.parent
GUIDES_DIR = ROOT / "guides"
NOTEBOOKS_DIR = GUIDES_DIR / "ipynb"

HEADER_FIELDS = (
    "Title",
    "Author",
    "Date created",
    "Last modified",
    "Description",
    "Accelerator",
)
ACCELERATORS = ("GPU", "TPU", "None")
INSTALL_COMMAND = "!pip install -q keras-vmoe"
FENCE = '"""'


def guide_paths(guides_dir=GUIDES_DIR):
    """The guide scripts, sorted by name."""
    return sorted(p for p in pathlib.Path(guides_dir).glob("*.py") if p.is_file())


def notebook_path(guide_path):
    """Where the notebook of a guide goes: `guides/ipynb/<name>.ipynb`."""
    guide_path = pathlib.Path(guide_path)
    return guide_path.parent / "ipynb" / (guide_path.stem + ".ipynb")


def parse_header(text):
    """The header fields of a guide and the text that follows the header.

    Returns:
        `(fields, body)`: a dict from field name to value, in file order, and
        the rest of the script.

    Raises:
        ValueError: the script does not start with a header holding exactly
            the fields of `HEADER_FIELDS`, in that order.
    """
    lines = text.split("\n")
    if not lines or lines[0] != FENCE:
        raise ValueError(f"A guide must start with a {FENCE}-fenced header.")
    try:
        end = lines.index(FENCE, 1)
    except ValueError:
        raise ValueError("The header is not closed.") from None
    fields = {}
    for line in lines[1:end]:
        key, sep, value = line.partition(": ")
        if not sep:
            raise ValueError(f"Header line {line!r} is not `Field: value`.")
        fields[key] = value.strip()
    if tuple(fields) != HEADER_FIELDS:
        raise ValueError(
            f"The header fields must be {', '.join(HEADER_FIELDS)} in this "
            f"order; got {', '.join(fields)}."
        )
    if fields["Accelerator"] not in ACCELERATORS:
        raise ValueError(
            f"`Accelerator:` must be one of {ACCELERATORS}, got "
            f"{fields['Accelerator']!r}."
        )
    return fields, "\n".join(lines[end + 1 :])


def split_cells(body):
    """Splits the body of a guide into `(cell_type, source)` pairs.

    A line that starts with `\"\"\"` opens a markdown cell, which the next
    such line closes. Code between markdown cells is one code cell. Leading
    and trailing blank lines are dropped, and so are empty cells.
    """
    cells = []
    lines = body.split("\n")
    i = 0
    while i < len(lines):
        if lines[i].startswith(FENCE):
            if lines[i] != FENCE:
                raise ValueError(
                    f"Line {lines[i]!r}: a markdown fence must be alone on its line."
                )
            try:
                end = lines.index(FENCE, i + 1)
            except ValueError:
                raise ValueError("A markdown cell is not closed.") from None
            cells.append(("markdown", lines[i + 1 : end]))
            i = end + 1
            continue
        start = i
        while i < len(lines) and not lines[i].startswith(FENCE):
            i += 1
        cells.append(("code", lines[start:i]))
    result = []
    for cell_type, cell_lines in cells:
        source = "\n".join(cell_lines).strip("\n")
        if source.strip():
            result.append((cell_type, source))
    return result


def header_markdown(fields):
    """The first markdown cell: title, author, dates and description."""
    return (
        f"# {fields['Title']}\n\n"
        f"**Author:** {fields['Author']}<br>\n"
        f"**Date created:** {fields['Date created']}<br>\n"
        f"**Last modified:** {fields['Last modified']}<br>\n"
        f"**Description:** {fields['Description']}"
    )


def guide_to_notebook(guide_path):
    """The notebook (an `nbformat.NotebookNode`) of a guide script."""
    guide_path = pathlib.Path(guide_path)
    fields, body = parse_header(guide_path.read_text(encoding="utf-8"))
    v4 = nbformat.v4
    cells = [
        v4.new_markdown_cell(header_markdown(fields)),
        v4.new_code_cell(INSTALL_COMMAND),
    ]
    for cell_type, source in split_cells(body):
        if cell_type == "markdown":
            cells.append(v4.new_markdown_cell(source))
        else:
            cells.append(v4.new_code_cell(source))
    for index, cell in enumerate(cells):
        # Deterministic ids, so that regenerating an unchanged guide gives
        # an identical file.
        cell["id"] = f"{guide_path.stem}-{index:03d}".replace("_", "-")
        cell["metadata"] = {
            "colab_type": "code" if cell.cell_type == "code" else "text"
        }
    metadata = {
        "colab": {
            "collapsed_sections": [],
            "name": guide_path.stem,
            "private_outputs": False,
            "provenance": [],
            "toc_visible": True,
        },
        "kernelspec": {
            "display_name": "Python 3",
            "language": "python",
            "name": "python3",
        },
        "language_info": {"name": "python"},
    }
    if fields["Accelerator"] != "None":
        metadata["accelerator"] = fields["Accelerator"]
    return v4.new_notebook(cells=cells, metadata=metadata)


def notebook_text(notebook):
    """The exact text written for a notebook (validated first)."""
    nbformat.validate(notebook)
    return nbformat.writes(notebook, version=4) + "\n"


def stale_notebooks(guides_dir=GUIDES_DIR):
    """Guides whose notebook is missing or differs from the generator's output,
    and notebooks whose guide no longer exists."""
    stale = []
    guides = guide_paths(guides_dir)
    for guide in guides:
        path = notebook_path(guide)
        expected = notebook_text(guide_to_notebook(guide))
        if not path.is_file() or path.read_text(encoding="utf-8") != expected:
            stale.append(path)
    names = {guide.stem for guide in guides}
    notebooks_dir = pathlib.Path(guides_dir) / "ipynb"
    for path in sorted(notebooks_dir.glob("*.ipynb")):
        if path.stem not in names:
            stale.append(path)
    return stale


def write_notebooks(guides_dir=GUIDES_DIR):
    """Writes every guide's notebook; returns the paths that changed."""
    changed = []
    for guide in guide_paths(guides_dir):
        path = notebook_path(guide)
        text = notebook_text(guide_to_notebook(guide))
        if not path.is_file() or path.read_text(encoding="utf-8") != text:
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_text(text, encoding="utf-8")
            changed.append(path)
    return changed


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--check",
        action="store_true",
        help="Write nothing; exit 1 if a notebook is missing or out of date.",
    )
    args = parser.parse_args(argv)
    if args.check:
        stale = stale_notebooks()
        for path in stale:
            print(f"out of date: {path.relative_to(ROOT)}")
        if stale:
            print("Run `make notebooks` to regenerate them.")
        return 1 if stale else 0
    for path in write_notebooks():
        print(f"wrote {path.relative_to(ROOT)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
