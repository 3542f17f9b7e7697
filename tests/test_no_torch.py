"""Jobs that need no model never import torch, and the torch-free paths give what transformers gives."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap

import pytest

from layerscope.data.dataset import example_text, load_examples, load_tokens, prepare
from layerscope.models.loading import _auto_config, dims_from_config, load_tokenizer
from tests.conftest import REPO, write_jsonl

RECORDS = [
    {"text": "The quick brown fox jumps over the lazy dog."},
    {"text": "Numbers: 0 1 2 3 42 100 2024 3.14159 12345678, I'm don't WE'LL"},
    {"text": "Café in Zürich 🙂 東京 — “quotes” …\n\n\ttabs  and   spaces <|user|> inline special"},
    {"text": "def forward(self, x):\n    return self.down_proj(x)  # code\n"},
    {"messages": [{"role": "user", "content": "What is the capital of France?"},
                  {"role": "assistant", "content": "Paris. 2024 🙂"}]},
    {"messages": [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "  hi\n"}]},
]


@pytest.mark.parametrize("name", ["llama-tiny", "qwen2-tiny", "gpt2-tiny"])
def test_tokenization_equals_autotokenizer(model_factory, tmp_path, name):
    from transformers import AutoTokenizer

    m = model_factory(name)
    ours, auto = load_tokenizer({"model": m}), AutoTokenizer.from_pretrained(m["path"])
    assert type(ours) is type(auto)
    data = write_jsonl(tmp_path / "d.jsonl", RECORDS)
    for tok, out in ((ours, tmp_path / "ours"), (auto, tmp_path / "auto")):
        prepare(data, tok, out, max_length=64)
    assert [example_text(e) for e in load_examples(tmp_path / "ours" / "examples.jsonl")] == \
           [example_text(e) for e in load_examples(tmp_path / "auto" / "examples.jsonl")]
    for a, b in zip(load_tokens(tmp_path / "ours"), load_tokens(tmp_path / "auto")):
        assert a.tolist() == b.tolist()


@pytest.mark.parametrize("name", ["llama-tiny", "qwen2-tiny", "gpt2-tiny", "llama-512"])
def test_dims_from_raw_keys_equal_autoconfig(name):
    from layerscope.models.builtin import hf_config_dict

    cfg = hf_config_dict(name)
    c = _auto_config(cfg)
    d = dims_from_config(cfg)
    assert (d.num_layers, d.hidden_size) == (c.num_hidden_layers, c.hidden_size)
    assert d.intermediate_size == (getattr(c, "intermediate_size", None) or c.n_inner)


def test_dims_fill_missing_width_from_autoconfig():
    from transformers import LlamaConfig

    # a config.json that leaves intermediate_size to the class default; GPT-2's null n_inner means 4 x hidden
    assert dims_from_config({"model_type": "llama", "num_hidden_layers": 2, "hidden_size": 64}).intermediate_size \
        == LlamaConfig().intermediate_size
    assert dims_from_config({"model_type": "gpt2", "n_layer": 2, "n_embd": 64, "n_inner": None}).intermediate_size \
        == 256


def test_local_fetch_and_tokenization_do_not_import_torch(model_factory, tmp_path):
    m = model_factory("llama-tiny")
    data = write_jsonl(tmp_path / "d.jsonl", RECORDS)
    code = textwrap.dedent(f"""
        import json, sys
        from layerscope.steps import fetch_model, prepare_dataset
        fetch_model({{"id": {m["path"]!r}}}, None, "w", "manifest.json")
        prepare_dataset("manifest.json", {{"path": {str(data)!r}, "format": "auto", "default_split": "all",
                        "max_length": 64, "add_special_tokens": True}}, "ds")
        print(json.dumps(sorted(k for k in sys.modules if k.split(".")[0] == "torch")))
    """)
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(REPO / "src"), os.environ.get("PYTHONPATH", "")])}
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=tmp_path, env=env,
                         timeout=300)
    assert res.returncode == 0, res.stderr[-3000:]
    assert json.loads(res.stdout.strip().splitlines()[-1]) == []
    assert (tmp_path / "ds" / "token_ids.npy").is_file()


def test_tables_read_from_source_equal_transformers():
    """The ast-read copies of AutoTokenizer's tables are what transformers builds at import."""
    from transformers.models.auto.configuration_auto import CONFIG_MAPPING_NAMES
    from transformers.models.auto.tokenization_auto import (MODELS_WITH_INCORRECT_HUB_TOKENIZER_CLASS,
                                                            TOKENIZER_MAPPING_NAMES)

    from layerscope.models.loading import _OPTIONAL, _auto_tokenizer_tables

    names, incorrect, known = _auto_tokenizer_tables()
    assert known == set(CONFIG_MAPPING_NAMES) and incorrect == MODELS_WITH_INCORRECT_HUB_TOKENIZER_CLASS
    assert set(names) == set(TOKENIZER_MAPPING_NAMES)
    assert all(v == TOKENIZER_MAPPING_NAMES[k] for k, v in names.items() if v != _OPTIONAL)


def test_capture_refuses_a_tokenizer_class_that_drifted(model_factory, monkeypatch):
    """If the torch-free choice of tokenizer class ever differs from AutoTokenizer's, capture stops."""
    import layerscope.models.loading as models
    from layerscope.errors import ModelError
    from layerscope.capture.partial import load_block

    manifest = {"model": model_factory("qwen2-tiny"), "adapter": None}
    load_block(manifest, "cpu", "float32", False, 0, 0)  # the choices agree
    monkeypatch.setattr(models, "_tokenizer_class", lambda d: type("Other", (), {}))
    with pytest.raises(ModelError, match="tokenized with Other but transformers' AutoTokenizer loads"):
        load_block(manifest, "cpu", "float32", False, 0, 0)


def test_a_job_process_imports_neither_numpy_nor_torch_before_its_step():
    """What every workflow script imports (the steps and run_step) stays light: a step handed to
    the warm worker costs its job's own process only this."""
    code = ("import json, sys; from layerscope.steps import run_step, capture, store, summarize; "
            "import layerscope; print(json.dumps(sorted({k for k in sys.modules} & "
            "{'numpy', 'torch', 'zarr', 'transformers', 'importlib.metadata'}))); layerscope.Run; "
            "print(json.dumps('numpy' in sys.modules)); print(json.dumps(layerscope.__version__))")
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(REPO / "src"), os.environ.get("PYTHONPATH", "")])}
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=120)
    assert res.returncode == 0, res.stderr[-3000:]
    before, after, version = res.stdout.strip().splitlines()
    assert json.loads(before) == []
    assert json.loads(after) is True  # the reader (and numpy) load when first used
    from importlib.metadata import version as installed

    assert json.loads(version) == installed("layerscope")  # so does the version
