"""The guides in `guides/`: their format, their notebooks, and that they run.

Each guide runs top to bottom in its own Python process with
`KERAS_BACKEND=jax` and `KERAS_VMOE_GUIDE_QUICK=1` (tiny sizes), as a user
would run the script. A guide is backend-agnostic and the subprocess always
uses JAX, so the runs happen once, in the JAX test session; the format and
notebook checks are cheap and run everywhere.

The guides run two at a time (`KERAS_VMOE_GUIDE_JOBS` changes that) from the
first test that needs one; each test waits for its own guide.
"""

import glob
import importlib.util
import os
import re
import subprocess
import sys
import time

import keras
import nbformat
import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
GUIDES_DIR = os.path.join(ROOT, "guides")
GUIDES = (
    "routers_tour",
    "pretraining",
    "fewshot",
    "router_study",
    "scaling_out",
    "converting_checkpoints",
    "upcycling",
)
# Extra environment per guide (scaling_out simulates 8 devices on the CPU).
GUIDE_ENV = {"scaling_out": {"XLA_FLAGS": "--xla_force_host_platform_device_count=8"}}
# Files each guide writes into its working directory (glob patterns), and
# lines it prints.
EXPECTED_FILES = {
    "routers_tour": (
        "routers_tour_tensors.png",
        "routers_tour_dropping.png",
        "routers_tour_soft.png",
    ),
    "pretraining": (
        "pretraining_curves.png",
        "pretraining_run/best.weights.h5",
        "pretraining_run/preset/config.json",
    ),
    "fewshot": ("fewshot_pixels_sweep.png", "fewshot_model_sweep.png"),
    "router_study": (
        "tmp/router_study_*/results.json",
        "tmp/router_study_*/accuracy.png",
        "tmp/router_study_*/routing.png",
    ),
    "scaling_out": (),
    "converting_checkpoints": (
        "converted/vmoe_tc_k2_bpr/config.json",
        "converted/vmoe_tc_k2_bpr/metadata.json",
        "converted/vmoe_tc_k2_bpr/model.weights.h5",
        "finetuned_animal_mnist/config.json",
    ),
    "upcycling": (
        "upcycled_preset/config.json",
        "upcycled_preset/model.weights.h5",
        "upcycled_run/preset/config.json",
    ),
}
EXPECTED_OUTPUT = {
    "routers_tour": (
        "largest difference:",
        # The hand-written gates: Token Choice K=1, C=2 drops tokens 2, 4
        # and 5; Expert Choice C=2 skips token 1 and takes token 5 twice.
        "  experts per token: [1, 1, 0, 1, 0, 0]\n",
        "  experts per token: [1, 0, 1, 1, 1, 2]\n",
    ),
    "pretraining": (
        "The first run was interrupted",
        "backup left after the run: False",
    ),
    "fewshot": ("fewshot/digits/25shot",),
    "router_study": ("exit status: 0", "is not prepared"),
    "scaling_out": ("every weight is laid out as the layout map says",),
    "converting_checkpoints": (
        "exit status: 0",
        "weights: converted",
        "matches vmoe to 1e-4: True",
        "same logits as the preset: True",
        "fine-tuned test accuracy:",
    ),
    "upcycling": (
        "every expert equals the dense MLP: True",
        "head copied: True",
        "same outputs as the dense model: True",
        "exit status: 0",
        "router of the preset: softmax_expert_choice",
        "keras-hub ViT, pooling of the V-MoE: gap",
        "channels_first: keras-hub ViTBackbone option `data_format=",
    ),
}
GUIDE_TIMEOUT_S = 420
ON_JAX = keras.backend.backend() == "jax"
RUNS_ON_JAX_ONLY = pytest.mark.skipif(
    not ON_JAX,
    reason="guides are backend-agnostic and always execute in a JAX subprocess; "
    "they run once, in the KERAS_BACKEND=jax test session",
)
HEADER_FIELDS = (
    "Title",
    "Author",
    "Date created",
    "Last modified",
    "Description",
    "Accelerator",
)


def _load_make_notebooks():
    path = os.path.join(ROOT, "tools", "make_notebooks.py")
    spec = importlib.util.spec_from_file_location("make_notebooks", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


make_notebooks = _load_make_notebooks()


def guide_path(name):
    return os.path.join(GUIDES_DIR, f"{name}.py")


def guide_text(name):
    with open(guide_path(name), encoding="utf-8") as f:
        return f.read()


# ---------------------------------------------------------------------------
# Format.
# ---------------------------------------------------------------------------


def test_every_guide_is_tested():
    found = {
        os.path.splitext(p)[0] for p in os.listdir(GUIDES_DIR) if p.endswith(".py")
    }
    assert found == set(GUIDES)


@pytest.mark.parametrize("name", GUIDES)
def test_header(name):
    fields, _ = make_notebooks.parse_header(guide_text(name))
    assert tuple(fields) == HEADER_FIELDS
    assert fields["Title"]
    assert fields["Author"] == "keras_vmoe team"
    for key in ("Date created", "Last modified"):
        assert re.fullmatch(r"\d{4}/\d{2}/\d{2}", fields[key]), key
    description = fields["Description"]
    assert len(description) < 100, f"{len(description)} characters: {description}"
    assert description[0].isupper() and description.endswith("."), description
    assert fields["Accelerator"] in ("GPU", "None")


@pytest.mark.parametrize("name", GUIDES)
def test_style(name):
    text = guide_text(name)
    lines = text.split("\n")
    assert len(lines) <= 500, f"{len(lines)} lines"
    # The backend selector cell, with a comment naming the other backends.
    match = re.search(r'((?:#.*\n)+)os\.environ\["KERAS_BACKEND"\] = "jax"\n', text)
    assert match, "no backend selector cell"
    assert "tensorflow" in match.group(1) and "torch" in match.group(1)
    assert 'os.environ.get("KERAS_VMOE_GUIDE_QUICK") == "1"' in text
    for number, line in enumerate(lines, 1):
        assert line == line.rstrip(), f"trailing whitespace on line {number}"
        # keras.io tutobooks: no one-line """-fenced strings at column 0.
        assert not (
            line.startswith('"""') and line.endswith('"""') and len(line) > 3
        ), f"one-line fenced string on line {number}"


# ---------------------------------------------------------------------------
# Notebooks.
# ---------------------------------------------------------------------------


@pytest.mark.parametrize("name", GUIDES)
def test_notebook_is_valid_and_up_to_date(name):
    path = os.path.join(GUIDES_DIR, "ipynb", f"{name}.ipynb")
    assert os.path.isfile(path), "run `make notebooks`"
    with open(path, encoding="utf-8") as f:
        text = f.read()
    notebook = nbformat.reads(text, as_version=4)
    nbformat.validate(notebook)
    expected = make_notebooks.notebook_text(
        make_notebooks.guide_to_notebook(guide_path(name))
    )
    assert text == expected, "the notebook is out of date: run `make notebooks`"

    fields, _ = make_notebooks.parse_header(guide_text(name))
    first, install = notebook.cells[0], notebook.cells[1]
    assert first.cell_type == "markdown"
    assert first.source.startswith(f"# {fields['Title']}\n")
    assert fields["Description"] in first.source
    assert install.cell_type == "code"
    assert install.source == "!pip install -q keras-vmoe"
    assert notebook.metadata["colab"]["name"] == name
    if fields["Accelerator"] == "GPU":
        assert notebook.metadata["accelerator"] == "GPU"
    else:
        assert "accelerator" not in notebook.metadata
    # Every code line of the guide is in a code cell, every markdown line in
    # a markdown cell.
    code = "\n".join(c.source for c in notebook.cells if c.cell_type == "code")
    assert 'os.environ["KERAS_BACKEND"] = "jax"' in code


def test_no_notebook_without_guide():
    notebooks = os.listdir(os.path.join(GUIDES_DIR, "ipynb"))
    assert {os.path.splitext(n)[0] for n in notebooks} == set(GUIDES)


def test_generator_splits_cells():
    body = 'import os\n\n"""\n## Title\n\nText.\n"""\n\nx = 1\n\n\n"""\nMore.\n"""\n'
    assert make_notebooks.split_cells(body) == [
        ("code", "import os"),
        ("markdown", "## Title\n\nText."),
        ("code", "x = 1"),
        ("markdown", "More."),
    ]
    with pytest.raises(ValueError, match="not closed"):
        make_notebooks.split_cells('"""\nopen\n')


def test_makefile_builds_notebooks():
    with open(os.path.join(ROOT, "Makefile"), encoding="utf-8") as f:
        makefile = f.read()
    assert re.search(
        r"^notebooks:.*\n\t\$\(PY\) tools/make_notebooks\.py$", makefile, re.M
    )


# ---------------------------------------------------------------------------
# Execution.
# ---------------------------------------------------------------------------

# Runs the guide as `python guide.py` would, with connections to anything but
# the local machine refused (as in the test process, see conftest.py).
_BOOTSTRAP = """
import runpy, socket, sys
_connect = socket.socket.connect
def _local_only(sock, address):
    host = address[0] if isinstance(address, tuple) else address
    if sock.family == getattr(socket, "AF_UNIX", None) or (
        isinstance(host, str) and (host in ("localhost", "::1") or host.startswith("127."))
    ):
        return _connect(sock, address)
    raise OSError(f"Network access is disabled in the guide tests ({address!r}).")
socket.socket.connect = _local_only
sys.argv = [sys.argv[1]]
runpy.run_path(sys.argv[0], run_name="__main__")
"""


class GuideRunner:
    """Runs the guides in subprocesses, a few at a time, and keeps results."""

    def __init__(self, workdir, jobs, names=GUIDES):
        self.workdir = workdir
        self.jobs = jobs
        self.pending = list(names)
        self.running = {}
        self.results = {}

    def _env(self, name, cwd):
        env = dict(os.environ)
        env.update(
            KERAS_BACKEND="jax",
            KERAS_VMOE_GUIDE_QUICK="1",
            MPLBACKEND="Agg",
            TF_CPP_MIN_LOG_LEVEL="2",
            TFDS_DATA_DIR=os.path.join(cwd, "tensorflow_datasets"),
            # Temporary files (the study's output folder, ...) stay in the
            # test's folder.
            TMPDIR=os.path.join(cwd, "tmp"),
            JAX_COMPILATION_CACHE_DIR=os.path.join(ROOT, ".jax_cache"),
            JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS="0.5",
            PYTHONPATH=os.pathsep.join(
                p for p in (ROOT, os.environ.get("PYTHONPATH")) if p
            ),
        )
        # The simulated devices only where a guide asks for them.
        env.pop("XLA_FLAGS", None)
        env.update(GUIDE_ENV.get(name, {}))
        return env

    def _start(self, name):
        cwd = os.path.join(self.workdir, name)
        os.makedirs(os.path.join(cwd, "tmp"))
        log = open(os.path.join(cwd, "output.log"), "w+", encoding="utf-8")
        process = subprocess.Popen(
            [sys.executable, "-c", _BOOTSTRAP, guide_path(name)],
            cwd=cwd,
            env=self._env(name, cwd),
            stdout=log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
        self.running[name] = (process, time.monotonic(), cwd, log)

    def _collect(self):
        for name, (process, start, cwd, log) in list(self.running.items()):
            elapsed = time.monotonic() - start
            if process.poll() is None and elapsed < GUIDE_TIMEOUT_S:
                continue
            timed_out = process.poll() is None
            if timed_out:
                process.kill()
                process.wait()
            log.seek(0)
            self.results[name] = {
                "returncode": process.returncode,
                "timed_out": timed_out,
                "seconds": elapsed,
                "cwd": cwd,
                "output": log.read(),
            }
            log.close()
            del self.running[name]

    def result(self, name):
        """Waits for a guide (starting it first if needed) and returns its run."""
        if name not in self.running and name not in self.results:
            if name in self.pending:
                self.pending.remove(name)
            self.pending.insert(0, name)
        while name not in self.results:
            self._collect()
            while self.pending and len(self.running) < self.jobs:
                self._start(self.pending.pop(0))
            if name not in self.results:
                time.sleep(0.2)
        return self.results[name]

    def close(self):
        for process, _, _, log in self.running.values():
            process.kill()
            process.wait()
            log.close()
        self.running.clear()


@pytest.fixture(scope="module")
def guide_runner(request, tmp_path_factory):
    # Start only the guides whose test was selected (e.g. with -k).
    selected = [
        item.callspec.params["name"]
        for item in request.session.items
        if getattr(item, "originalname", None) == "test_guide_runs"
    ]
    jobs = int(os.environ.get("KERAS_VMOE_GUIDE_JOBS", "2"))
    runner = GuideRunner(str(tmp_path_factory.mktemp("guides")), jobs, selected)
    yield runner
    runner.close()


@RUNS_ON_JAX_ONLY
@pytest.mark.parametrize("name", GUIDES)
def test_guide_runs(name, guide_runner):
    run = guide_runner.result(name)
    tail = run["output"][-6000:]
    assert not run["timed_out"], f"{name} ran over {GUIDE_TIMEOUT_S} s:\n{tail}"
    assert run["returncode"] == 0, f"{name} failed:\n{tail}"
    print(f"{name}: {run['seconds']:.1f} s")
    for pattern in EXPECTED_FILES[name]:
        assert glob.glob(os.path.join(run["cwd"], pattern)), f"no {pattern}"
    for line in EXPECTED_OUTPUT[name]:
        assert line in run["output"], f"{line!r} not printed:\n{tail}"
    assert "Traceback" not in run["output"], tail
