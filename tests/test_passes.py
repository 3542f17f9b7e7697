"""Prompted passes (issue 9): prompts, answer distributions, generation, per-pass stores, re-runs."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
import zarr

from layerscope.data.dataset import load_examples, load_tokens
from layerscope.errors import ConfigError, DataError
from layerscope.fileio import read_json
from layerscope.models.loading import load_model, load_tokenizer
from layerscope.passes.answers import answer_pass, parse_reply
from layerscope.passes.prompts import prepare_pass, resolve_pass
from tests.conftest import copy_inputs, planned_jobs, run_snakemake, write_jsonl

QUESTIONS = [
    {"id": "a", "question": "What is the chemical symbol for gold?", "options": ["Ag", "Au", "Gd", "Go"],
     "answer": "B", "split": "s"},
    {"id": "b", "question": "Which planet is not a gas giant?",
     "options": {"A": "Jupiter", "B": "Saturn", "C": "Mars", "D": "Neptune"}, "answer": "C", "split": "s"},
    {"id": "c", "question": "Who might have written Hamlet?", "options": ["Shakespeare", "Dickens", "Austen"],
     "answer": "A", "split": "t", "subject": "literature"},
    {"id": "d", "question": "How many legs does a spider have?", "options": ["6", "8", "10"], "split": "t"},
]
TASK = {"format": "jsonl", "default_split": "all", "max_length": 400, "chat": "auto"}


def task_file(tmp: Path, records=QUESTIONS) -> dict:
    return {**TASK, "path": str(write_jsonl(tmp / "questions.jsonl", records))}


def answered(tmp: Path, manifest: dict, name: str, spec: dict | None = None, task: dict | None = None,
             batch_size: int = 3) -> tuple[list[dict], Path]:
    spec = resolve_pass(name, spec or {})
    spec.setdefault("generate", {"max_new_tokens": 0, "temperature": 0.0, "top_p": 1.0, "seed": 0})
    tok = load_tokenizer(manifest)
    prepare_pass(task or task_file(tmp), spec, tok, tmp / "prompts")
    recs = answer_pass(manifest, str(tmp / "prompts"), str(tmp / "dataset"), str(tmp / "answers.json"), spec,
                       batch_size)
    return recs, tmp


def hand_logits(model, ids: np.ndarray) -> torch.Tensor:
    with torch.inference_mode():
        return model(torch.from_numpy(ids.astype(np.int64))[None]).logits[0, -1].double()


@pytest.fixture(scope="module")
def tiny(model_factory):
    return {"model": model_factory("llama-tiny"), "adapter": None}


def test_prompts_render_the_template_through_the_chat_template(tiny, tmp_path):
    tok = load_tokenizer(tiny)
    spec = resolve_pass("mcq", {})
    prepare_pass(task_file(tmp_path), spec, tok, tmp_path / "prompts")
    ex = load_examples(tmp_path / "prompts/examples.jsonl")
    by_hand = ("Answer the following multiple-choice question.\n\nWhich planet is not a gas giant?\n\n"
               "A. Jupiter\nB. Saturn\nC. Mars\nD. Neptune\n\nReply with the letter of the correct option only.")
    b = next(e for e in ex if e["id"] == "b")
    assert b["text"] == tok.apply_chat_template([{"role": "user", "content": by_hand}], tokenize=False,
                                                add_generation_prompt=True)
    ids, offsets = load_tokens(tmp_path / "prompts")
    assert ids[offsets[b["index"]]:offsets[b["index"] + 1]].tolist() == tok(b["text"], add_special_tokens=False)["input_ids"]
    assert [e["id"] for e in ex] == ["a", "b", "c", "d"]  # grouped by split, file order inside one
    choices = read_json(tmp_path / "prompts/choices.json")["choices"]
    assert choices[2]["labels"] == ["A", "B", "C"]
    assert choices[0]["token_ids"] == [tok(x, add_special_tokens=False)["input_ids"][0] for x in "ABCD"]
    # no chat template: the template, then the cue; the labels are read after a space
    two = [{"id": "y", "question": "Is water wet?", "options": ["yes", "no"]}]
    prepare_pass({**task_file(tmp_path, two), "chat": False}, spec, tok, tmp_path / "plain")
    plain = load_examples(tmp_path / "plain/examples.jsonl")[0]
    assert plain["text"] == ("Answer the following multiple-choice question.\n\nIs water wet?\n\nA. yes\nB. no\n\n"
                             "Reply with the letter of the correct option only.\nAnswer:")
    assert read_json(tmp_path / "plain/choices.json")["choices"][0]["token_ids"] == [
        tok(" " + x, add_special_tokens=False)["input_ids"][0] for x in "AB"]
    # this small tokenizer has no " C" or " D" piece: both start with a lone space, and are refused
    with pytest.raises(DataError, match=r"questions.jsonl:1: choices C, D start with the same token"):
        prepare_pass({**task_file(tmp_path), "chat": False}, spec, tok, tmp_path / "refused")


@pytest.mark.parametrize("name", ["mcq", "self_confidence"])
def test_probabilities_equal_a_hand_computation_from_the_logits(tiny, tmp_path, name):
    recs, d = answered(tmp_path, tiny, name)
    model, _ = load_model(tiny)
    ids, offsets = load_tokens(d / "prompts")
    mids = np.array([100 * (i + 0.5) / 8 for i in range(8)])
    for e, r in enumerate(recs):
        full = hand_logits(model, ids[offsets[e]:offsets[e + 1]])
        z = full[r["choice_token_ids"]].numpy()
        p = np.exp(z - z.max()) / np.exp(z - z.max()).sum()
        np.testing.assert_allclose(r["logits"], z, atol=1e-4)
        np.testing.assert_allclose(r["probs"], p, atol=1e-5)
        assert r["entropy"] == pytest.approx(-(p * np.log(p)).sum(), abs=1e-5)
        assert r["argmax_answer"] == r["parsed_answer"] == r["choices"][int(np.argmax(z))]
        assert r["choice_probability_mass"] == pytest.approx(float(torch.softmax(full, 0)[r["choice_token_ids"]].sum()),
                                                             rel=1e-4)
        assert r["answer_token_index"] == offsets[e + 1] - offsets[e] - 1
        q = QUESTIONS[e]
        if name == "mcq" and "answer" in q:
            k = r["choices"].index(q["answer"])
            assert r["logit_margin"] == pytest.approx(z[k] - np.delete(z, k).max(), abs=1e-4)
            assert r["is_correct"] == (r["parsed_answer"] == q["answer"])
        elif name == "mcq":
            assert r["logit_margin"] is None and r["is_correct"] is None
        else:
            assert r["choices"] == list("ABCDEFGH")
            assert r["self_confidence"] == r["expected_confidence"] == pytest.approx(p @ mids, abs=1e-3)
            assert r["confidence_token_index"] == r["answer_token_index"]
    # seed 004's surface features, by hand for one question
    c = recs[2]
    assert (c["char_length"], c["question_type"], c["has_negation"], c["has_ambiguity"]) == (
        len(QUESTIONS[2]["question"]), "who", False, True)
    assert recs[1]["has_negation"] and recs[1]["question_type"] == "which"
    q_ids = load_tokenizer(tiny)(QUESTIONS[2]["question"], add_special_tokens=False)["input_ids"]
    assert (c["token_length"], c["token_rarity_max"]) == (len(q_ids), max(q_ids))
    assert c["token_rarity_mean"] == pytest.approx(np.mean(q_ids))
    assert c["subject"] == "literature" and c["prompt_type"] == name


def test_a_model_built_to_prefer_one_letter_answers_it(tmp_path):
    """Attention and MLP outputs zeroed, so the last position's stream is its token's embedding; the
    unembedding row of 'C' is that embedding scaled up: every question gets C."""
    from layerscope.models.builtin import build_model
    from layerscope.models.loading import fetch, parse_ref
    from transformers import AutoModelForCausalLM, AutoTokenizer

    src = build_model("llama-tiny", 0, tmp_path / "src")
    tok = AutoTokenizer.from_pretrained(src)
    model = AutoModelForCausalLM.from_pretrained(src)
    cue = tok.apply_chat_template([{"role": "user", "content": "x"}], tokenize=False, add_generation_prompt=True)
    last = tok(cue, add_special_tokens=False)["input_ids"][-1]
    c = tok("C", add_special_tokens=False)["input_ids"][0]
    with torch.no_grad():
        for layer in model.model.layers:
            layer.self_attn.o_proj.weight.zero_()
            layer.mlp.down_proj.weight.zero_()
        model.config.tie_word_embeddings = False
        model.lm_head.weight = torch.nn.Parameter(model.lm_head.weight.detach().clone())
        model.lm_head.weight[c] = 200 * model.model.embed_tokens.weight[last]
    model.save_pretrained(tmp_path / "prefers-c")
    tok.save_pretrained(tmp_path / "prefers-c")
    m = fetch(parse_ref({"id": str(tmp_path / "prefers-c")}), tmp_path / "w")
    (tmp_path / "run").mkdir()
    recs, _ = answered(tmp_path / "run", {"model": m}, "mcq")
    assert [r["parsed_answer"] for r in recs] == ["C"] * len(QUESTIONS)
    assert all(r["probs"][2] > 0.99 for r in recs)
    assert [r["is_correct"] for r in recs] == [False, True, False, None]


def test_generation_with_a_seed_is_reproducible_and_captured_as_tokens(tiny, tmp_path):
    gen = {"max_new_tokens": 6, "temperature": 1.0, "top_p": 0.9, "seed": 7}
    runs = []
    for k, seed in enumerate((7, 7, 8)):
        d = tmp_path / f"r{k}"
        d.mkdir()
        recs, _ = answered(d, tiny, "other_confidence", {"generate": {**gen, "seed": seed}})
        runs.append((recs, *load_tokens(d / "dataset")))
    (r1, ids1, off1), (r2, ids2, off2), (r3, ids3, _) = runs
    assert np.array_equal(ids1, ids2) and [r["output_text"] for r in r1] == [r["output_text"] for r in r2]
    assert not np.array_equal(ids1, ids3), "another seed drew the same replies"
    p_ids, p_off = load_tokens(tmp_path / "r0/prompts")
    ai = np.load(tmp_path / "r0/dataset/answer_index.npy")
    for e, r in enumerate(r1):
        seq = ids1[off1[e]:off1[e + 1]]
        prompt = p_ids[p_off[e]:p_off[e + 1]]
        assert np.array_equal(seq[:len(prompt)], prompt) and len(seq) == len(prompt) + r["output_tokens"]
        assert ai[e] == len(prompt) - 1 == r["answer_token_index"]
        assert 0 < r["output_tokens"] <= 6 and r["max_new_tokens"] == 6 and r["temperature"] == 1.0


def test_greedy_generation_equals_generate_one_prompt_at_a_time(tiny, tmp_path):
    recs, d = answered(tmp_path, tiny, "mcq", {"generate": {"max_new_tokens": 5, "temperature": 0.0, "top_p": 1.0,
                                                            "seed": 0}})
    model, tok = load_model(tiny)
    p_ids, p_off = load_tokens(d / "prompts")
    ids, off = load_tokens(d / "dataset")
    for e, r in enumerate(recs):
        prompt = torch.from_numpy(p_ids[p_off[e]:p_off[e + 1]].astype(np.int64))[None]
        out = model.generate(prompt, attention_mask=torch.ones_like(prompt), max_new_tokens=5, do_sample=False,
                             pad_token_id=tok.pad_token_id)[0, prompt.shape[1]:].numpy()
        eos = np.flatnonzero(out == tok.eos_token_id)
        out = out[:eos[0] + 1] if len(eos) else out
        assert ids[off[e]:off[e + 1]][prompt.shape[1]:].tolist() == out.tolist()
        assert r["output_text"] == tok.decode(out, skip_special_tokens=True)
        # the distribution still comes from the prompt's last position
        z = hand_logits(model, p_ids[p_off[e]:p_off[e + 1]])[r["choice_token_ids"]].numpy()
        np.testing.assert_allclose(r["logits"], z, atol=1e-4)


def test_a_reply_names_its_choice():
    assert parse_reply(" B", list("ABCD")) == "B"
    assert parse_reply("The answer is (C).", list("ABCD")) == "C"
    assert parse_reply("Answer: D, not A", list("ABCD")) == "D"
    assert parse_reply("I cannot tell", list("ABCD")) is None  # "I" is no choice, "cannot" has no lone letter


@pytest.mark.parametrize("record,message", [
    ({"id": "x", "question": "Q?", "options": {"A": "a", "B": "b", "D": "d"}}, "option C is missing"),
    ({"id": "x", "question": "Q?", "options": ["a", "", "c"]}, "option B is missing"),
    ({"id": "x", "question": "Q?", "options": ["a", "b"], "answer": "E"}, "answer 'E' is not among the options (A, B)"),
    ({"id": "x", "question": "", "options": ["a", "b"]}, "non-empty string 'question'"),
    ({"id": "x", "question": "Q?"}, "'options' must be a list"),
    ({"id": "x", "question": "Q?", "options": ["a", "b"], "prompt_tokens": 3}, "field 'prompt_tokens' is reserved"),
])
def test_a_bad_question_is_one_error_with_file_and_line(tiny, tmp_path, record, message):
    task = task_file(tmp_path, [QUESTIONS[0], record])
    with pytest.raises(DataError) as e:
        prepare_pass(task, resolve_pass("mcq", {}), load_tokenizer(tiny), tmp_path / "prompts")
    assert str(e.value).startswith(f"{task['path']}:2: ") and message in str(e.value)
    assert not (tmp_path / "prompts/examples.jsonl").exists()


def test_a_template_field_a_record_lacks_names_its_line(tiny, tmp_path):
    spec = resolve_pass("custom", {"template": "{subject}: {question}\n{options}", "answers": "options"})
    task = task_file(tmp_path)
    with pytest.raises(DataError, match=rf"^{task['path']}:1: the template of pass 'custom' uses {{subject}}"):
        prepare_pass(task, spec, load_tokenizer(tiny), tmp_path / "prompts")


@pytest.mark.parametrize("spec,message", [
    ({"template": "   "}, "passes.mcq.template: the template is empty"),
    ({"template": "{question} {"}, "passes.mcq.template: Single '{' encountered"),
    ({"template": "{question} {answer}"}, "passes.mcq.template: {answer} would show the model the correct answer"),
    ({"template": "{question} {bins}", "answers": "options"}, "passes.mcq.template: {bins} lists confidence ranges"),
])
def test_a_bad_template_is_a_config_error(spec, message):
    with pytest.raises(ConfigError, match="config error: " + message.replace("{", r"\{").replace("(", r"\(")):
        resolve_pass("mcq", spec)
    with pytest.raises(ConfigError, match="passes.mine.answers: required"):
        resolve_pass("mine", {"template": "{question}"})


# ---------------------------------------------------------------------------------------------
# Through the workflow

CONFIG = {
    "run": "p",
    "model": {"id": "builtin:llama-tiny"},
    "dataset": {"path": "config/datasets/demo.jsonl", "max_length": 32},
    "task": {"path": "questions.jsonl", "max_length": 400},
    "passes": {"mcq": {"positions": "answer"}, "other_confidence": {"generate": {"max_new_tokens": 4}}},
    "capture": {"layers": [1, 3], "sites": ["resid_post"], "positions": "all", "layers_per_job": 2,
                "dtype": "float32", "batch_size": 3, "parts": 1},
}


@pytest.fixture(scope="module")
def passes_run(tmp_path_factory) -> Path:
    wd = copy_inputs(tmp_path_factory.mktemp("passes"))
    write_jsonl(wd / "questions.jsonl", QUESTIONS)
    (wd / "passes.yaml").write_text(yaml.safe_dump(CONFIG))
    res = run_snakemake(wd, "--cores", "2", configfile=wd / "passes.yaml")
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]
    return wd


def resid_post(manifest: dict, ids: np.ndarray) -> list[np.ndarray]:
    """Each decoder layer's output for one unpadded sequence, by plain forward hooks."""
    model, _ = load_model(manifest)
    out: list[np.ndarray] = []
    hooks = [layer.register_forward_hook(lambda m, a, o: out.append((o[0] if isinstance(o, tuple) else o)[0].numpy()))
             for layer in model.model.layers]
    with torch.inference_mode():
        model(torch.from_numpy(ids.astype(np.int64))[None])
    for h in hooks:
        h.remove()
    return out


def test_each_pass_is_a_run_with_its_questions_and_store(passes_run):
    import layerscope

    r = passes_run / "results/p"
    manifest = read_json(r / "model/manifest.json")
    meta = json.loads((r / "mcq/metadata.json").read_text())
    assert [q["question_id"] for q in meta] == ["a", "b", "c", "d"] and meta[1]["prompt_type"] == "mcq"
    assert meta == read_json(r / "mcq/answers.json")
    mcq = layerscope.open(r / "mcq")
    assert mcq.questions == meta and mcq.metadata["dataset_name"] == "questions.mcq"
    acts = mcq.activations(3, "resid_post")
    assert acts.positions == "answer" and acts.shape == (4, 64)
    ids, off = load_tokens(r / "mcq/dataset")
    for e, q in enumerate(meta):
        hs = resid_post(manifest, ids[off[e]:off[e + 1]])
        np.testing.assert_allclose(acts[e], hs[3][q["answer_token_index"]], atol=1e-4)
    # the generating pass: every position of prompt + reply, the reply's tokens included
    oc = layerscope.open(r / "other_confidence")
    ids, off = load_tokens(r / "other_confidence/dataset")
    assert oc.activations(1, "resid_post").shape == (int(off[-1]), 64)
    assert sum(q["output_tokens"] for q in oc.questions) > 0
    for e, q in enumerate(oc.questions):
        assert off[e + 1] - off[e] == q["prompt_tokens"] + q["output_tokens"]
        hs = resid_post(manifest, ids[off[e]:off[e + 1]])
        np.testing.assert_allclose(oc.activations(1, "resid_post")[e], hs[1], atol=1e-4)
    # the reply's tokens alone, by the spans each example records
    x, owner = oc.select(1, "resid_post", "response")
    want = [e for e, q in enumerate(oc.questions) for _ in range(q["output_tokens"])]
    assert owner.tolist() == want and len(want) == sum(q["output_tokens"] for q in oc.questions)
    full = oc.activations(1, "resid_post")
    np.testing.assert_array_equal(x, np.concatenate([full[e][q["prompt_tokens"]:] for e, q in enumerate(oc.questions)]))
    # the run's own capture is untouched by the passes
    assert layerscope.open(r).metadata["dataset_name"] == "demo"
    cfg = read_json(r / "mcq/run_config.json")["config"]
    assert cfg["pass"]["name"] == "mcq" and cfg["task"]["path"] == "questions.jsonl"


def changed(cfg: dict, key: str, value) -> dict:
    from tests.test_reruns import with_change

    return with_change(key, value, cfg)


def pass_jobs(name: str, upto: str = "prepare_pass") -> list[str]:
    """A pass's jobs from ``upto`` on (``capture``: its capture jobs), as dry runs list them."""
    steps = ["prepare_pass", "answer_pass"]
    first = steps[steps.index(upto):] if upto in steps else []
    captures = [f"pass_{name}_L0{a}-0{a + 1}:0" for a in (0, 2)]
    return sorted(first + captures + ["store_pass", "pass_metadata", "all"])


BOTH = sorted(pass_jobs("mcq") + [j for j in pass_jobs("other_confidence") if j != "all"])
# (key, value, jobs): what a change re-runs on a finished run with passes (config/README.md's table)
PASS_TABLE = [
    ("passes.mcq.template", "Q: {question}\n{options}", pass_jobs("mcq")),
    ("passes.mcq.cue", "\nA:", pass_jobs("mcq")),  # even where a chat template leaves it unused
    ("passes.mcq.positions", "all", pass_jobs("mcq", "capture")),
    ("passes.other_confidence.positions", "response", pass_jobs("other_confidence", "capture")),  # its replies
    ("passes.other_confidence.generate", {"max_new_tokens": 2}, pass_jobs("other_confidence", "answer_pass")),
    ("passes.other_confidence.bins", 4, pass_jobs("other_confidence")),
    ("passes.other_confidence.answers", "confidence", []),  # what the built-in pass already answers
    ("task.max_length", 300, BOTH),
    ("task.chat", False, BOTH),
    ("task.format", "jsonl", []),
    ("task.default_split", "other", BOTH),
    ("task.path", "copy.jsonl", BOTH),
    ("passes", {"mcq": {"positions": "answer"}}, []),  # dropping a pass re-runs nothing
]


@pytest.mark.parametrize("key,value,expected", PASS_TABLE, ids=[f"{k}={v}" for k, v, _ in PASS_TABLE])
def test_a_change_to_one_pass_reruns_only_that_pass(passes_run, tmp_path, key, value, expected):
    if key == "task.path":
        shutil.copy(passes_run / "questions.jsonl", passes_run / value)
    cfg = tmp_path / "changed.yaml"
    cfg.write_text(yaml.safe_dump(changed(CONFIG, key, value)))
    try:
        jobs = sorted(f"{rule}:{dict(w)['part']}" if "part" in dict(w) else rule
                      for rule, w in planned_jobs(passes_run, configfile=cfg))
    finally:
        if key == "task.path":
            (passes_run / value).unlink()
    assert jobs == expected


def test_an_empty_template_stops_the_workflow_naming_file_and_line(tmp_path):
    wd = copy_inputs(tmp_path)
    write_jsonl(wd / "questions.jsonl", QUESTIONS)
    cfg = wd / "bad.yaml"
    cfg.write_text(yaml.safe_dump(changed(CONFIG, "passes.mcq.template", "")))
    line = next(i for i, t in enumerate(cfg.read_text().splitlines(), 1) if "template:" in t)
    res = run_snakemake(wd, "--cores", "1", "-n", configfile=cfg)
    assert res.returncode != 0
    assert f"{cfg}:{line}: config error: passes.mcq.template: the template is empty" in res.stdout + res.stderr
    assert not (wd / "results").exists()


def test_passes_need_a_task_and_one_variant(tmp_path):
    from layerscope.config import build_plan
    from tests.conftest import REPO

    schema = REPO / "workflow/schemas/config.schema.yaml"
    wd = copy_inputs(tmp_path)
    write_jsonl(wd / "questions.jsonl", QUESTIONS)
    with pytest.raises(ConfigError, match="config error: passes: the passes need questions; set task.path"):
        build_plan({**CONFIG, "task": None}, schema, wd)
    with pytest.raises(ConfigError, match="config error: task.path: file .*nope.jsonl does not exist"):
        build_plan(changed(CONFIG, "task.path", "nope.jsonl"), schema, wd)
    cfg = {**CONFIG, "adapter": {"id": "builtin:lora"}, "capture": {**CONFIG["capture"], "variants": ["adapter", "base"]}}
    with pytest.raises(ConfigError, match="config error: passes: prompted passes capture one model"):
        build_plan(cfg, schema, wd)
    with pytest.raises(ConfigError, match="passes.mcq.generate.max_new_tokens: task.max_length 400 \\+ 5000"):
        build_plan(changed(CONFIG, "passes.mcq.generate", {"max_new_tokens": 5000}), schema, wd)


def _plan(wd: Path) -> dict:
    import subprocess
    import sys

    res = subprocess.run([sys.executable, "-m", "layerscope", "plan", "--directory", str(wd), "--configfile",
                          str(wd / "passes.yaml"), "--json"], capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, res.stderr[-2000:]
    return {p["name"]: p for p in json.loads(res.stdout.strip().splitlines()[-1])["passes"]}


def test_plan_counts_each_pass(passes_run, tmp_path):
    """`plan` per pass: before the run, the prompts' tokens exactly and replies at their longest; after
    it, the stores' bytes exactly and as many jobs as each pass ran."""
    fresh = copy_inputs(tmp_path / "fresh")
    shutil.copy(passes_run / "questions.jsonl", fresh / "questions.jsonl")
    shutil.copy(passes_run / "passes.yaml", fresh / "passes.yaml")
    before, after = _plan(fresh), _plan(passes_run)
    assert set(before) == set(after) == {"mcq", "other_confidence"}
    for name, est in after.items():
        pdir = passes_run / "results/p" / name
        assert est["exact"] and est["tokens"] == int(np.load(pdir / "dataset/offsets.npy")[-1])
        prompts = np.load(pdir / "prompts/offsets.npy")
        new = CONFIG["passes"][name].get("generate", {}).get("max_new_tokens", 0)
        assert before[name]["exact"] == (new == 0)
        assert before[name]["tokens"] == int(prompts[-1]) + new * (len(prompts) - 1) >= est["tokens"]
        g = zarr.open_group(str(pdir / "activations.zarr"), mode="r")
        arrays = g.attrs["layerscope"]["arrays"]
        assert est["arrays"] == len(arrays)
        assert est["array_bytes"] == sum(int(np.prod(g[a].shape)) * g[a].dtype.itemsize for a in arrays)
        assert est["disk_bytes"] == sum(f.stat().st_size for f in (pdir / "activations.zarr").rglob("c/*/*"))
        ran = [f for f in (passes_run / "logs/p" / name).rglob("*.log")]
        assert est["jobs"] == len(ran) and est["array_bytes"] > 0, (est, ran)
        from layerscope.capture.chain import Boundary

        assert est["boundary_bytes"] == sum(Boundary(f)._data.nbytes for f in (pdir / "boundaries").glob("*"))
