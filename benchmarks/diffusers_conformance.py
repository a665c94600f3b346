"""diffusers' own CogVideoX tests, run with every model patched by ``cogvideox_kernels.integrations.diffusers``.

The integration's conformance check: the tests of diffusers (at the installed version's tag) for the
CogVideoX transformer, VAE, the four CogVideoX pipelines and LoRA, run twice: as they are, and with
``apply`` called on every ``CogVideoXTransformer3DModel`` / ``AutoencoderKLCogVideoX`` right after it is
built (this file, loaded as a pytest plugin, wraps their ``__init__``). A test that passes unpatched must
pass patched. Reports pass/fail counts for both runs, the tests whose outcome differs, and how many
patched tests ran our ops (counted per test).

    python benchmarks/diffusers_conformance.py --diffusers-git PATH [--backend reference] [-n 1] [--out DIR]
    python benchmarks/diffusers_conformance.py --diffusers-git PATH --extract-to DIR   # then, elsewhere:
    python benchmarks/diffusers_conformance.py --tests-root DIR --backend auto        # e.g. on a GPU

PATH: a git repository (a clone or mirror) of huggingface/diffusers; the tests are taken from the tag
``v<installed version>`` (or ``--ref``; without that tag, the newest release tag not above the installed
version, with a note). The machine needs no network: the tests' only Hub download,
``hf-internal-testing/tiny-random-t5``, is replaced by a tiny T5 (d_model 32, random weights, a word-level
tokenizer) built here, in both runs alike, so tests that compare against the Hub model's numbers fail in
both. The LoRA tests import ``parameterized`` (diffusers' test extra): ``pip install parameterized``.
``--backend triton`` runs the transformer ops in the Triton kernels (CPU: under TRITON_INTERPRET=1;
slow); the VAE convs use ``reference`` on CPU (our conv kernels need a GPU or the C++ build).
"""
from __future__ import annotations

import argparse
import functools
import json
import os
import re
import subprocess
import sys
import tarfile
import tempfile
import time
import xml.etree.ElementTree as ET
from collections import Counter
from pathlib import Path

TEST_FILES = [
    "tests/models/transformers/test_models_transformer_cogvideox.py",
    "tests/models/autoencoders/test_models_autoencoder_kl_cogvideox.py",
    "tests/pipelines/cogvideo/test_cogvideox.py",
    "tests/pipelines/cogvideo/test_cogvideox_image2video.py",
    "tests/pipelines/cogvideo/test_cogvideox_video2video.py",
    "tests/pipelines/cogvideo/test_cogvideox_fun_control.py",
    "tests/lora/test_lora_layers_cogvideox.py",
]
JSON_COLUMNS = ("file", "tests", "unpatched_passed", "unpatched_failed", "unpatched_skipped", "patched_passed",
                "patched_failed", "patched_skipped", "patched_ran_our_ops")
PATCH_ENV = "CVK_CONFORMANCE_PATCH"  # "off" or the transformer backend ("reference", "triton", "auto")
COUNTS_ENV = "CVK_CONFORMANCE_COUNTS"  # folder for the per-test op-call counts
TINY_T5 = "hf-internal-testing/tiny-random-t5"


# ----------------------------------------------------------------------------------- pytest plugin


def pytest_configure(config):
    _offline_tiny_t5()
    backend = os.environ.get(PATCH_ENV, "off")
    if backend != "off":
        _patch_models(backend)


def _patch_models(backend):
    """Every CogVideoX transformer / VAE gets ``apply`` right after its ``__init__``; our ops count calls."""
    from diffusers import AutoencoderKLCogVideoX, CogVideoXTransformer3DModel

    from cogvideox_kernels.integrations import diffusers as integration

    for cls, kwargs in ((CogVideoXTransformer3DModel, {"backend": backend}),
                        (AutoencoderKLCogVideoX, {"backend": "reference" if backend != "auto" else "auto"})):
        init = cls.__init__

        @functools.wraps(init)  # keeps the signature that ConfigMixin.from_config reads
        def patched_init(self, *args, _init=init, _cls=cls, _kwargs=kwargs, **kw):
            _init(self, *args, **kw)
            if type(self) is _cls:
                integration.apply(self, **_kwargs)

        cls.__init__ = patched_init
    for name in ("rope3d_attention", "expert_ffn", "causal_conv3d"):
        real = getattr(integration, name)

        def counted(*args, _real=real, _name=name, **kwargs):
            _CALLS[_name] += 1
            return _real(*args, **kwargs)

        setattr(integration, name, counted)


_CALLS: Counter = Counter()
_PER_TEST: dict = {}


def _junit_id(nodeid: str) -> str:
    """pytest's node id as the junit XML names the test: ``a.b.test_file.Class::test[param]``."""
    parts = nodeid.split("::")
    return ".".join([parts[0].removesuffix(".py").replace("/", ".")] + parts[1:-1]) + "::" + parts[-1]


def pytest_runtest_logreport(report):
    if report.when == "call" and os.environ.get(PATCH_ENV, "off") != "off":
        _PER_TEST[_junit_id(report.nodeid)] = dict(_CALLS)
        _CALLS.clear()


def pytest_runtest_setup(item):
    _CALLS.clear()


def pytest_sessionfinish(session):
    folder = os.environ.get(COUNTS_ENV)
    if folder and _PER_TEST:
        worker = os.environ.get("PYTEST_XDIST_WORKER", "main")
        Path(folder, f"counts-{worker}.json").write_text(json.dumps(_PER_TEST))


_WORDS = ("the a an of to and in is on for with at by from up out dance monkey cat dog video frame frames "
          "prompt photo panda guitar playing bamboo forest sky sun red blue green small big slow fast").split()


@functools.lru_cache(maxsize=None)
def _tiny_t5_dir() -> str:
    """A tiny T5 encoder (d_model 32, as the tests' transformers expect) and a word-level tokenizer, saved
    once to a temp folder that stands in for the Hub's ``hf-internal-testing/tiny-random-t5``."""
    import torch
    from tokenizers import Tokenizer, models, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast, T5Config, T5EncoderModel

    folder = tempfile.mkdtemp(prefix="tiny-t5-")
    specials = ["<pad>", "</s>", "<unk>"]
    vocab = {w: i for i, w in enumerate(specials + _WORDS)}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.post_processor = processors.TemplateProcessing(single="$A </s>", pair="$A </s> $B </s>",
                                                       special_tokens=[("</s>", vocab["</s>"])])
    PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<pad>", eos_token="</s>", unk_token="<unk>",
                            model_max_length=512).save_pretrained(folder)
    config = T5Config(vocab_size=len(vocab), d_model=32, d_kv=8, d_ff=37, num_layers=2, num_heads=4,
                      relative_attention_num_buckets=8, pad_token_id=0, eos_token_id=1, decoder_start_token_id=0)
    torch.manual_seed(0)
    T5EncoderModel(config).save_pretrained(folder)
    config.save_pretrained(folder)
    return folder


def _offline_tiny_t5():
    """Point the tests' ``from_pretrained("hf-internal-testing/tiny-random-t5")`` at the local stand-in."""
    import transformers

    def redirect(owner, attr):
        original = getattr(owner, attr)
        func = original.__func__

        def from_pretrained(cls, name, *args, **kwargs):
            if isinstance(name, str) and name == TINY_T5:
                name = _tiny_t5_dir()
            return func(cls, name, *args, **kwargs)

        setattr(owner, attr, classmethod(functools.wraps(func)(from_pretrained)))

    for owner in (transformers.AutoConfig, transformers.AutoTokenizer, transformers.PreTrainedModel,
                  transformers.PretrainedConfig, transformers.PreTrainedTokenizerBase):
        redirect(owner, "from_pretrained")


# ------------------------------------------------------------------------------------------- runner


def _git(repo, *args, binary=False):
    out = subprocess.run(["git", "--git-dir", str(repo), *args], capture_output=True, check=True)
    return out.stdout if binary else out.stdout.decode().strip()


def _git_dir(path: Path) -> Path:
    return path / ".git" if (path / ".git").exists() else path


def _version_key(text):
    m = re.fullmatch(r"v?(\d+)\.(\d+)\.(\d+)", text)
    return tuple(int(x) for x in m.groups()) if m else None


def pick_ref(repo: Path, version: str, ref: str | None) -> tuple[str, str]:
    """(ref, note): the installed version's tag, or the newest release tag not above it."""
    if ref:
        return ref, ""
    tag = f"v{version}"
    try:
        _git(repo, "rev-parse", "--verify", f"{tag}^{{commit}}")
        return tag, ""
    except subprocess.CalledProcessError:
        pass
    want = _version_key(version.split("+")[0].split(".dev")[0])
    tags = [t for t in _git(repo, "tag", "--list", "v*").split() if _version_key(t) and _version_key(t) <= want]
    if not tags:
        raise SystemExit(f"{repo}: no tag {tag} and no release tag below it; pass --ref")
    best = max(tags, key=_version_key)
    return best, f"the repository has no tag {tag}: tests taken from {best}, the newest release tag below it"


def extract_tests(repo: Path, ref: str, dest: Path) -> None:
    data = _git(repo, "archive", "--format=tar", ref, "tests", binary=True)
    with tempfile.TemporaryFile() as f:
        f.write(data)
        f.seek(0)
        with tarfile.open(fileobj=f) as tar:
            tar.extractall(dest, filter="data")


def run_pytest(root: Path, files, backend: str, workers: int, out: Path, extra) -> tuple[dict, dict]:
    """Run the tests once; returns ({nodeid: outcome}, {nodeid: op calls})."""
    tag = "unpatched" if backend == "off" else f"patched-{backend}"
    junit, counts = out / f"junit-{tag}.xml", out / f"counts-{tag}"
    counts.mkdir(parents=True, exist_ok=True)
    env = dict(os.environ, **{PATCH_ENV: backend, COUNTS_ENV: str(counts)})
    env["PYTHONPATH"] = os.pathsep.join([str(Path(__file__).resolve().parent), env.get("PYTHONPATH", "")])
    cmd = [sys.executable, "-m", "pytest", "-p", "diffusers_conformance", "-q", "-o", "addopts=",
           f"--junitxml={junit}", "-p", "no:cacheprovider", *extra, *files]
    if workers > 0:
        cmd[3:3] = ["-n", str(workers)]
    start = time.time()
    with open(out / f"pytest-{tag}.log", "w") as log:
        rc = subprocess.run(cmd, cwd=root, env=env, stdout=log, stderr=subprocess.STDOUT).returncode
    print(f"  {tag}: pytest exit {rc} in {time.time() - start:.0f} s (log: {out / f'pytest-{tag}.log'})", flush=True)
    outcomes = {}
    if junit.exists():
        for case in ET.parse(junit).getroot().iter("testcase"):
            nodeid = f"{case.get('classname')}::{case.get('name')}"
            kinds = {child.tag for child in case}
            outcomes[nodeid] = ("failed" if kinds & {"failure", "error"} else
                                "skipped" if "skipped" in kinds else "passed")
    calls = {}
    for f in counts.glob("counts-*.json"):
        calls.update(json.loads(f.read_text()))
    return outcomes, calls


def _in_file(test_id: str, path: str) -> bool:
    module = path.removesuffix(".py").replace("/", ".")
    return test_id.startswith(module + ".") or test_id.startswith(module + "::")


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    source = parser.add_mutually_exclusive_group(required=True)
    source.add_argument("--diffusers-git", type=Path, help="a git clone/mirror of huggingface/diffusers")
    source.add_argument("--tests-root", type=Path, help="a folder holding diffusers' tests/ already extracted "
                        "(see --extract-to), e.g. on a machine without the repository")
    parser.add_argument("--extract-to", type=Path, help="with --diffusers-git: only extract tests/ there and exit")
    parser.add_argument("--ref", help="tag or commit to take tests/ from (default: v<installed version>)")
    parser.add_argument("--backend", default="reference", choices=("reference", "triton", "auto"),
                        help="the transformer ops' backend in the patched run")
    parser.add_argument("-n", "--workers", type=int, default=1, help="pytest-xdist workers (0: no xdist)")
    parser.add_argument("-k", help="pytest -k expression (both runs)")
    parser.add_argument("--files", nargs="+", default=TEST_FILES, help="test files (paths inside the repository)")
    parser.add_argument("--out", type=Path, default=None, help="folder for logs, junit XML and the JSON summary")
    args = parser.parse_args(argv)

    import diffusers

    if args.diffusers_git is not None:
        repo = _git_dir(args.diffusers_git.resolve())
        ref, note = pick_ref(repo, diffusers.__version__, args.ref)
        commit = _git(repo, "rev-parse", f"{ref}^{{commit}}")
        root = args.extract_to or Path(tempfile.mkdtemp(prefix="diffusers-tests-"))
        root.mkdir(parents=True, exist_ok=True)
        extract_tests(repo, ref, root)
        (root / "TESTS_REF").write_text(f"{ref} {commit} {note}\n")
        if args.extract_to:
            print(f"tests/ of {ref} ({commit[:10]}) extracted to {root}")
            return 0
    else:
        root = args.tests_root.resolve()
        ref, commit, note = (root / "TESTS_REF").read_text().split(" ", 2) if (root / "TESTS_REF").exists() \
            else ("unknown", "unknown", "")
        note = note.strip()
    out = (args.out or Path(tempfile.mkdtemp(prefix="diffusers-conformance-"))).resolve()
    out.mkdir(parents=True, exist_ok=True)
    files = [f for f in args.files if (root / f).exists()]
    print(f"diffusers {diffusers.__version__}: tests from {ref} ({commit[:10]}); {len(files)} files; out {out}")
    if note:
        print(f"  note: {note}")
    try:
        import parameterized  # noqa: F401
    except ImportError:
        print("  note: `parameterized` is not installed: the LoRA tests will not import (pip install parameterized)")
    extra = ["-k", args.k] if args.k else []
    unpatched, _ = run_pytest(root, files, "off", args.workers, out, extra)
    patched, calls = run_pytest(root, files, args.backend, args.workers, out, extra)

    rows = []
    for f in files + ["total"]:
        ids = [i for i in unpatched.keys() | patched.keys() if f == "total" or _in_file(i, f)]
        u, p = Counter(unpatched.get(i, "missing") for i in ids), Counter(patched.get(i, "missing") for i in ids)
        ran = sum(1 for i in ids if sum(calls.get(i, {}).values()) > 0)
        rows.append((Path(f).name if f != "total" else "total", len(ids), u["passed"], u["failed"], u["skipped"],
                     p["passed"], p["failed"], p["skipped"], ran))
    regressions = sorted(i for i in unpatched if unpatched[i] == "passed" and patched.get(i) != "passed")
    fixed = sorted(i for i in patched if patched[i] == "passed" and unpatched.get(i) != "passed")
    op_calls = Counter()
    for c in calls.values():
        op_calls.update(c)

    head = ("file", "tests", "pass", "fail", "skip", "pass", "fail", "skip", "ran ours")
    print(f"\n{'':44s}{'unpatched':>21s}{'patched (' + args.backend + ')':>24s}")
    print(f"{head[0]:44s}{head[1]:>6s}" + "".join(f"{h:>7s}" for h in head[2:-1]) + f"{head[-1]:>10s}")
    for r in rows:
        print(f"{r[0]:44s}{r[1]:6d}" + "".join(f"{v:7d}" for v in r[2:-1]) + f"{r[-1]:10d}")
    print(f"\nop calls in the patched run: {dict(op_calls)}")
    print(f"passed unpatched, not patched ({len(regressions)}):" + "".join(f"\n  {i}" for i in regressions))
    print(f"passed patched only ({len(fixed)}):" + "".join(f"\n  {i}" for i in fixed))
    summary = {"diffusers": diffusers.__version__, "tests_ref": ref, "tests_commit": commit, "note": note,
               "backend": args.backend, "rows": [dict(zip(JSON_COLUMNS, r)) for r in rows],
               "regressions": regressions, "passed_patched_only": fixed, "op_calls": dict(op_calls),
               "outcomes": {"unpatched": unpatched, "patched": patched}}
    (out / "summary.json").write_text(json.dumps(summary, indent=1))
    return 1 if regressions else 0


if __name__ == "__main__":
    sys.exit(main())
