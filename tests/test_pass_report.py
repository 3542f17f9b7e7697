"""``inspect RUN --pass PASS``: the numbers against a hand computation from the passes'
metadata.json files and the stores' arrays (read with zarr), the refusals, and the command line."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import zarr

from layerscope.analysis.compare import compare
from layerscope.errors import LayerScopeError
from layerscope.passes.report import calibration, confidence_bin, pass_report, to_json
from tests.conftest import REPO
from tests.pass_runs import pass_run
from tests.test_compare import by_hand


@pytest.fixture(scope="module")
def base(tmp_path_factory) -> Path:
    return pass_run(tmp_path_factory, "base")


@pytest.fixture(scope="module")
def lora(tmp_path_factory) -> Path:
    return pass_run(tmp_path_factory, "lora")


def records(run: Path, name: str) -> list[dict]:
    return json.loads((run / name / "metadata.json").read_text(encoding="utf-8"))


def answer_rows(pass_dir: Path, layer: int) -> np.ndarray:
    """Each question's vector at its answer position, float64, by hand from the store and the data set."""
    x = zarr.open_array(str(pass_dir / f"activations.zarr/layer_{layer:02d}/resid_post"), mode="r")[:]
    offsets = np.load(pass_dir / "dataset/offsets.npy")
    index = [r["answer_token_index"] for r in json.loads((pass_dir / "metadata.json").read_text())]
    return x[offsets[:-1] + np.array(index)].astype(np.float64)


@pytest.mark.parametrize("name", ["mcq", "self_confidence", "other_confidence"])
def test_numbers_equal_a_hand_computation(name, base):
    recs = records(base, name)
    rep = pass_report(base, name)
    s = rep["summary"]
    known = [r["is_correct"] for r in recs if r["is_correct"] is not None]
    assert (s["questions"], s["answered"], s["correct"]) == (8, len(known), sum(known))
    if name == "mcq":
        assert len(known) == 8 and s["accuracy"] == pytest.approx(np.mean(known))
    else:
        assert not known and s["accuracy"] is None
        assert s["mean_expected_confidence"] == pytest.approx(np.mean([r["expected_confidence"] for r in recs]))
    assert s["mean_entropy"] == pytest.approx(np.mean([r["entropy"] for r in recs]), rel=1e-12)
    assert s["mean_choice_probability_mass"] == pytest.approx(np.mean([r["choice_probability_mass"] for r in recs]))
    assert sum(s["answers"].values()) == 8
    assert s["answers"] == {c: sum(r["parsed_answer"] == c for r in recs) for c in recs[0]["choices"]}
    assert list(rep["splits"]) == ["science", "history"]
    for split, ss in rep["splits"].items():
        part = [r for r in recs if r["split"] == split]
        assert ss["questions"] == len(part) == 4
        assert ss["mean_entropy"] == pytest.approx(np.mean([r["entropy"] for r in part]), rel=1e-12)
        if name == "mcq":
            assert ss["accuracy"] == pytest.approx(np.mean([r["is_correct"] for r in part]))
    assert (rep["calibration"] is None) == (name == "mcq")
    assert rep["store"] == {"layers": [0, 2], "sites": ["resid_post"], "positions": ["all"],
                            "tokens": int(np.load(base / name / "dataset/offsets.npy")[-1]),
                            "bytes": sum(f.stat().st_size for f in (base / name / "activations.zarr").rglob("*")
                                         if f.is_file())}


def test_calibration_of_a_run_equals_a_hand_computation(base):
    conf, mcq = records(base, "self_confidence"), records(base, "mcq")
    cal = pass_report(base, "self_confidence")["calibration"]
    assert cal["against"] == "mcq" and cal["questions"] == 8
    right = {r["question_id"]: r["is_correct"] for r in mcq}
    bins: dict[int, list] = {}
    for r in conf:
        bins.setdefault(min(int(r["expected_confidence"] // 12.5), 7), []).append(r)
    ece = 0.0
    for j, row in enumerate(cal["bins"]):
        inside = bins.get(j, [])
        assert row["count"] == len(inside)
        if inside:
            c = np.mean([r["expected_confidence"] for r in inside])
            acc = np.mean([right[r["question_id"]] for r in inside])
            assert (row["mean_confidence"], row["accuracy"]) == (pytest.approx(c), pytest.approx(acc))
            ece += len(inside) / 8 * abs(acc - c / 100)
        else:
            assert row["mean_confidence"] is None and row["accuracy"] is None
    assert cal["ece"] == pytest.approx(ece) and cal["ece"] > 0


def test_calibration_bins_and_ece():
    """Bin edges (a range holds its lower edge; 100 is in the last), questions left out, ECE by hand."""
    conf = [{"question_id": q, "expected_confidence": c} for q, c in
            [("a", 0.0), ("b", 12.5), ("c", 12.49), ("d", 100.0), ("e", 90.0), ("f", 60.0), ("g", 55.0), ("h", 50.0)]]
    options = [{"question_id": "a", "is_correct": False}, {"question_id": "b", "is_correct": True},
               {"question_id": "c", "is_correct": True}, {"question_id": "d", "is_correct": True},
               {"question_id": "e", "is_correct": False}, {"question_id": "f", "is_correct": True},
               {"question_id": "g", "is_correct": False}, {"question_id": "h", "is_correct": None}]  # h: answer unknown
    assert [confidence_bin(c["expected_confidence"], 8) for c in conf] == [0, 1, 0, 7, 7, 4, 4, 4]
    cal = calibration(conf, options, 8)
    assert cal["questions"] == 7
    got = {r["bin"]: (r["count"], r["mean_confidence"], r["accuracy"]) for r in cal["bins"] if r["count"]}
    assert got == {"A": (2, pytest.approx(6.245), 0.5), "B": (1, 12.5, 1.0), "E": (2, 57.5, 0.5), "H": (2, 95.0, 0.5)}
    ece = (2 * abs(0.5 - 0.06245) + abs(1 - 0.125) + 2 * abs(0.5 - 0.575) + 2 * abs(0.5 - 0.95)) / 7
    assert cal["ece"] == pytest.approx(ece)
    assert cal["accuracy"] == pytest.approx(4 / 7) and cal["mean_confidence"] == pytest.approx(
        (0 + 12.5 + 12.49 + 100 + 90 + 60 + 55) / 7)
    assert calibration(conf, [], 8)["ece"] is None


@pytest.mark.parametrize("name", ["mcq", "other_confidence"])
def test_compare_with_equals_a_hand_computation(name, base, lora):
    a, b = records(base, name), records(lora, name)
    rep = pass_report(base, name, compare_with=lora)
    c = rep["compare"]
    assert c["summary"] == pass_report(lora, name)["summary"]
    ch = c["changes"]
    changed = [(x, y) for x, y in zip(a, b) if x["parsed_answer"] != y["parsed_answer"]]
    assert ch["changed"] == len(changed) > 0  # the adapter changes answers: the counts below mean something
    assert [x["question_id"] for x in ch["first"]] == [x["question_id"] for x, _ in changed][:10]
    assert [(x["a"], x["b"]) for x in ch["first"]] == [(x["parsed_answer"], y["parsed_answer"]) for x, y in changed]
    if name == "mcq":
        pairs = [(x["is_correct"], y["is_correct"]) for x, y in zip(a, b)]
        assert (ch["known"], ch["right_to_wrong"], ch["wrong_to_right"]) == (
            8, sum(x and not y for x, y in pairs), sum(y and not x for x, y in pairs))
        assert ch["mean_confidence_change"] is None
    else:
        assert ch["known"] == ch["right_to_wrong"] == ch["wrong_to_right"] == 0
        assert ch["mean_confidence_change"] == pytest.approx(
            np.mean([y["expected_confidence"] - x["expected_confidence"] for x, y in zip(a, b)]))
        assert c["calibration"]["against"] == "mcq"
    act = c["activations"]
    assert act["skipped"] is None and [(r["layer"], r["site"], r["split"]) for r in act["rows"]] == \
           [(0, "resid_post", None), (2, "resid_post", None)]
    for r in act["rows"]:
        want = by_hand(answer_rows(base / name, r["layer"]), answer_rows(lora / name, r["layer"]))
        for k, v in want.items():
            assert r[k] == pytest.approx(v, rel=1e-9, abs=1e-12), (r["layer"], k)
        assert r["rel_l2"] > 0.1  # another model: equal rows would be a bug
    # a generating pass: the replies (so the tokens) differ, and only the answer position is compared
    assert (act["note"] is not None) == (name == "other_confidence")
    if name == "other_confidence":
        with pytest.raises(LayerScopeError, match="runs differ in tokens"):
            compare(base / name, lora / name, positions="last")


def test_the_answer_position_depends_on_the_prompt_only(base):
    """self_gen is self_confidence's prompt plus a reply: equal at the answer position, not at the last token."""
    a, b = records(base, "self_confidence"), records(base, "self_gen")
    assert [r["prompt_text"] for r in a] == [r["prompt_text"] for r in b] and all(r["output_tokens"] for r in b)
    for r in compare(base / "self_confidence", base / "self_gen", positions="answer"):
        assert r.n == 4 and r.cosine == pytest.approx(1, abs=1e-6) and r.rel_l2 < 1e-3, r
    with pytest.raises(LayerScopeError, match="runs differ in tokens"):
        compare(base / "self_confidence", base / "self_gen", positions="last")
    # answer arrays of a generating pass are read at the answer position, not at the last token
    x = answer_rows(base / "self_gen", 2)
    last = zarr.open_array(str(base / "self_gen/activations.zarr/layer_02/resid_post"), mode="r")[:][
        np.load(base / "self_gen/dataset/offsets.npy")[1:] - 1]
    assert not np.allclose(x, last)


def test_show_examples(base):
    recs = records(base, "other_confidence")
    rep = pass_report(base, "other_confidence", show_examples=2)
    assert [e["question_id"] for e in rep["examples"]] == ["q01", "q02"]
    for e, r in zip(rep["examples"], recs):
        assert (e["prompt_text"], e["output_text"], e["probs"], e["parsed_answer"]) == \
               (r["prompt_text"], r["output_text"], r["probs"], r["parsed_answer"])


def test_refusals(base, lora, tmp_path):
    with pytest.raises(LayerScopeError, match=r"no pass 'nope'; its passes are mcq, other_confidence, "
                                              r"self_confidence, self_gen$"):
        pass_report(base, "nope")
    with pytest.raises(LayerScopeError, match=r"passes-lora: no pass 'self_confidence'; its passes are mcq, "
                                              r"other_confidence$"):
        pass_report(base, "self_confidence", compare_with=lora)
    with pytest.raises(LayerScopeError, match="no finished prompted passes"):
        pass_report(tmp_path, "mcq")
    # questions that differ: a copy of the pass with one question's text changed
    other = tmp_path / "other"
    shutil.copytree(base / "mcq", other / "mcq")
    recs = records(other, "mcq")
    recs[2]["question_text"] += "?"
    (other / "mcq/metadata.json").write_text(json.dumps(recs))
    with pytest.raises(LayerScopeError, match=r"questions differ: first at question 'q03' \(#2\): question_text"):
        pass_report(base, "mcq", compare_with=other)
    recs = records(base, "mcq")[:5]
    (other / "mcq/metadata.json").write_text(json.dumps(recs))
    with pytest.raises(LayerScopeError, match=r"first at question 'q06' \(#5\), in .*/passes/mcq only"):
        pass_report(base, "mcq", compare_with=other)


def test_activations_skipped_when_the_prompts_differ(base, tmp_path):
    other = tmp_path / "other"
    shutil.copytree(base / "mcq", other / "mcq")
    idx = np.load(other / "mcq/dataset/answer_index.npy")
    idx[3] -= 1
    np.save(other / "mcq/dataset/answer_index.npy", idx)
    rep = pass_report(base, "mcq", compare_with=other)
    act = rep["compare"]["activations"]
    assert act["rows"] == [] and act["skipped"].startswith(
        "runs differ in their prompts: first at example 3 (id 'q04', split 'science'): the answer is read at token")
    assert rep["compare"]["changes"]["changed"] == 0


def test_calibration_without_an_options_pass(base, tmp_path):
    shutil.copytree(base / "self_confidence", tmp_path / "run/self_confidence")
    cal = pass_report(tmp_path / "run", "self_confidence")["calibration"]
    assert cal["against"] is None and "no single options pass" in cal["reason"]


def run_cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "layerscope", *args], capture_output=True, text=True, cwd=REPO)


def test_cli(base, lora):
    res = run_cli("inspect", str(base), "--pass", "mcq", "--show-examples", "2", "--compare-with", str(lora))
    assert res.returncode == 0, res.stderr
    rep = pass_report(base, "mcq", compare_with=lora)
    s, c = rep["summary"], rep["compare"]
    out = res.stdout
    assert f"accuracy     {s['accuracy']:.3f} ({s['correct']}/8)" in out
    assert "[0] q01 (science)" in out and "[1] q02 (science)" in out and "[2] q03" not in out
    assert f"{c['changes']['changed']} of 8 questions changed their parsed answer" in out
    assert "layer_00/resid_post" in out and "layer_02/resid_post" in out
    js = run_cli("inspect", str(base), "--pass", "self_confidence", "--show-examples", "1", "--json")
    assert js.returncode == 0, js.stderr
    assert json.loads(js.stdout) == json.loads(to_json(pass_report(base, "self_confidence", show_examples=1)))
    assert "calibration  stated confidence against pass mcq" in run_cli("inspect", str(base / "self_confidence")).stdout
    assert "passes     mcq, other_confidence, self_confidence, self_gen (inspect RUN --pass NAME)" in \
           run_cli("inspect", str(base)).stdout
    # compare --positions answer on two passes whose replies differ
    cmp = run_cli("compare", str(base / "other_confidence"), str(lora / "other_confidence"), "--positions", "answer",
                  "--json")
    assert cmp.returncode == 0, cmp.stderr
    assert {r["split"] for r in json.loads(cmp.stdout)["rows"]} == {"science", "history"}
    for args, msg in [(("--pass", "nope"), "no pass 'nope'; its passes are mcq, other_confidence, self_confidence, "
                                           "self_gen"),
                      (("--json",), "--compare-with and --json need --pass PASS"),
                      (("--pass", "self_confidence", "--compare-with", str(lora)), "no pass 'self_confidence'")]:
        bad = run_cli("inspect", str(base), *args)
        assert bad.returncode == 1 and bad.stderr.count("\n") == 1 and msg in bad.stderr, bad.stderr
