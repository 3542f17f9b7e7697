"""What a prompted pass did, and how two runs' passes differ (seed 004's ``inspect_collected_data``).

    rep = pass_report("results/passes", "mcq", show_examples=3, compare_with="results/passes-lora")
    print(format_report(rep))

Everything is computed from the pass's ``metadata.json`` records, except the activation
differences, which read the stores. Definitions:

- ``accuracy``: over the questions with a known answer (``is_correct`` not null), the share whose
  parsed answer is the correct one. Confidence passes have none.
- ``mean_entropy``: mean entropy (nats) of the distribution over the choices' tokens.
- ``mean_choice_probability_mass``: mean share of the model's whole next-token distribution at the
  answer position that falls on the choices' tokens (low: the model would rather say something else).
- ``mean_expected_confidence`` (confidence passes): mean over questions of sum_j p_j * m_j, p_j the
  probability of confidence range j and m_j its midpoint, in percent.
- Calibration (confidence passes, against the run's options pass: ``mcq`` if it has one, else its
  only pass answering with options): the questions both passes hold (by ``question_id``) whose
  answer is known. Each has a stated confidence c_i (the confidence pass's expected confidence,
  0-100) and an outcome y_i (1 if the options pass answered it correctly, else 0). They fall into
  the confidence pass's own k ranges by c_i: bin j holds 100 j/k <= c_i < 100 (j+1)/k, the last bin
  also 100. Per bin b: count n_b, mean stated confidence conf_b, accuracy acc_b = mean y_i.
  ``ece`` = sum_b (n_b / N) * |acc_b - conf_b / 100| (expected calibration error, Guo et al. 2017),
  a fraction from 0 (stated confidence matches accuracy in every bin) to 1.
- Answer changes (``compare_with``): per question (same position, same question), whether the
  parsed answer differs between the runs; for options passes, right -> wrong and wrong -> right
  among questions with a known answer.
- Activation differences: ``analysis.compare`` at each question's answer position, over all
  questions, per layer x site both runs hold (cosine, relative L2, norms; see there). A pass that
  generates gives each run its own reply tokens; the answer position comes before the reply and,
  in a causal model, its activations depend on the prompt only, so the comparison needs (and
  checks) identical prompt tokens only. Where the prompts differ it is skipped, with the reason.
"""

from __future__ import annotations

import json
import math
import os
from collections import Counter
from pathlib import Path
from typing import Any

import numpy as np

from layerscope.errors import LayerScopeError
from layerscope.fileio import human_bytes
from layerscope.passes.prompts import LETTERS, bin_ranges
from layerscope.passes.runs import (Pass, describe_passes, is_pass_dir, list_passes, load_pass, open_pass,
                                    pass_settings)

QUESTION_KEYS = ("question_id", "question_text", "options", "correct_answer_letter")
FIRST_CHANGES = 10  # changed questions listed by id


def _mean(values: list[float | None]) -> float | None:
    xs = [float(v) for v in values if v is not None]
    return sum(xs) / len(xs) if xs else None


def stats(records: list[dict[str, Any]]) -> dict[str, Any]:
    """Counts and means over ``records`` (see the module's definitions); None where undefined."""
    known = [r["is_correct"] for r in records if r.get("is_correct") is not None]
    labels = list(dict.fromkeys(c for r in records for c in r.get("choices") or []))
    parsed = Counter(r.get("parsed_answer") for r in records)
    return {
        "questions": len(records),
        "answered": len(known),
        "correct": sum(bool(x) for x in known),
        "accuracy": sum(bool(x) for x in known) / len(known) if known else None,
        "mean_entropy": _mean([r.get("entropy") for r in records]),
        "mean_choice_probability_mass": _mean([r.get("choice_probability_mass") for r in records]),
        "mean_expected_confidence": _mean([r.get("expected_confidence") for r in records]),
        "answers": {k: parsed.get(k, 0) for k in labels + sorted(k for k in parsed if k not in labels and k)},
    }


def split_stats(records: list[dict[str, Any]]) -> dict[str, dict[str, Any]]:
    """``stats`` per split, splits in store order."""
    splits = list(dict.fromkeys(r.get("split", "all") for r in records))
    return {s: stats([r for r in records if r.get("split", "all") == s]) for s in splits}


def confidence_bin(c: float, bins: int) -> int:
    """The range (0-based) of ``bins`` equal ranges of 0-100 that confidence ``c`` falls in."""
    return min(max(int(math.floor(c * bins / 100)), 0), bins - 1)


def calibration(conf: list[dict[str, Any]], options: list[dict[str, Any]], bins: int) -> dict[str, Any]:
    """Stated confidence (``conf`` records' expected confidence) against the options pass's
    correctness on the same questions, binned into ``bins`` ranges; see the module's definitions."""
    outcome = {r["question_id"]: r["is_correct"] for r in options if r.get("is_correct") is not None}
    pairs = [(float(r["expected_confidence"]), bool(outcome[r["question_id"]])) for r in conf
             if r.get("expected_confidence") is not None and r["question_id"] in outcome]
    rows = []
    for j, (lo, hi) in enumerate(bin_ranges(bins)):
        inside = [(c, y) for c, y in pairs if confidence_bin(c, bins) == j]
        rows.append({"bin": LETTERS[j], "range": [lo, hi], "count": len(inside),
                     "mean_confidence": _mean([c for c, _ in inside]),
                     "accuracy": _mean([float(y) for _, y in inside])})
    n = len(pairs)
    ece = (sum(r["count"] / n * abs(r["accuracy"] - r["mean_confidence"] / 100) for r in rows if r["count"])
           if n else None)
    return {"questions": n, "mean_confidence": _mean([c for c, _ in pairs]),
            "accuracy": _mean([float(y) for _, y in pairs]), "ece": ece, "bins": rows}


def options_pass_for(run_dir: str | os.PathLike, exclude: str) -> str | None:
    """The pass of ``run_dir`` a confidence pass is calibrated against: ``mcq`` if it answers with
    options, else the only other pass that does; None if there is none (or no single one)."""
    names = [n for n in list_passes(run_dir) if n != exclude]
    opts = [n for n in names if pass_settings(Path(run_dir) / n).get("answers", "options") == "options"]
    if "mcq" in opts:
        return "mcq"
    return opts[0] if len(opts) == 1 else None


def pass_calibration(run_dir: Path, p: Pass) -> dict[str, Any] | None:
    """``calibration`` of a confidence pass against its run's options pass (None for options passes)."""
    if p.answers != "confidence":
        return None
    against = options_pass_for(run_dir, p.name)
    if against is None:
        return {"against": None, "reason": f"{run_dir} has no single options pass (mcq) to check the stated "
                                           "confidence against"}
    other = open_pass(run_dir, against)
    return {"against": against, **calibration(p.records, other.records, p.bins)}


def check_same_questions(a: Pass, b: Pass) -> None:
    """Raise LayerScopeError naming the first question (by id) where the two passes differ."""
    ra, rb = a.records, b.records
    for i in range(max(len(ra), len(rb))):
        if i >= len(ra) or i >= len(rb):
            has = a if i < len(ra) else b
            q = has.records[i]["question_id"]
            raise LayerScopeError(f"the questions differ: first at question {q!r} (#{i}), in {has.path} only "
                                  f"({len(ra)} questions in {a.path}, {len(rb)} in {b.path})")
        for k in QUESTION_KEYS:
            if ra[i].get(k) != rb[i].get(k):
                q = ra[i]["question_id"]
                what = (f"id {rb[i]['question_id']!r} in {b.path}" if k == "question_id" else
                        f"{k} {ra[i].get(k)!r} in {a.path}, {rb[i].get(k)!r} in {b.path}")
                raise LayerScopeError(f"the questions differ: first at question {q!r} (#{i}): {what}; "
                                      "compare needs the same questions in the same order")


def answer_changes(a: list[dict[str, Any]], b: list[dict[str, Any]], first: int = FIRST_CHANGES) -> dict[str, Any]:
    """Per question (same position in both), whether the parsed answer changed from A to B."""
    changed = [(x, y) for x, y in zip(a, b) if x.get("parsed_answer") != y.get("parsed_answer")]
    known = [(x["is_correct"], y["is_correct"]) for x, y in zip(a, b)
             if x.get("is_correct") is not None and y.get("is_correct") is not None]
    conf = [y["expected_confidence"] - x["expected_confidence"] for x, y in zip(a, b)
            if x.get("expected_confidence") is not None and y.get("expected_confidence") is not None]
    return {
        "questions": len(a),
        "changed": len(changed),
        "known": len(known),
        "right_to_wrong": sum(1 for x, y in known if x and not y),
        "wrong_to_right": sum(1 for x, y in known if not x and y),
        "mean_confidence_change": _mean(conf),
        "first": [{"question_id": x["question_id"], "a": x.get("parsed_answer"), "b": y.get("parsed_answer"),
                   "correct": x.get("correct_answer_letter")} for x, y in changed[:first]],
    }


def activation_diff(a: Pass, b: Pass) -> dict[str, Any]:
    """How the passes' activations differ at the answer position, per layer x site (all questions)."""
    from layerscope.analysis.compare import compare

    out: dict[str, Any] = {"positions": "answer", "rows": [], "skipped": None, "note": None}
    try:
        rows = compare(a.run, b.run, positions="answer", by_split=False)
    except LayerScopeError as e:
        out["skipped"] = str(e)
        return out
    out["rows"] = [r.to_json() for r in rows]
    replies = sum(1 for x, y in zip(a.records, b.records) if x.get("output_text") != y.get("output_text"))
    if replies:
        out["note"] = (f"the replies differ in {replies} of {len(a.records)} questions, so the runs' tokens differ "
                       "after the answer position; compared there only, where the prompt tokens (identical) "
                       "decide the activations")
    return out


def example(r: dict[str, Any]) -> dict[str, Any]:
    """What ``show_examples`` shows of one record."""
    keys = ("index", "question_id", "split", "prompt_text", "output_text", "choices", "probs", "parsed_answer",
            "argmax_answer", "correct_answer_letter", "is_correct", "entropy", "expected_confidence")
    return {k: r.get(k) for k in keys}


def store_summary(p: Pass) -> dict[str, Any]:
    """What the pass's store holds: layers, sites, positions, tokens (prompt + reply) and bytes on disk."""
    r = p.run
    return {"layers": r.layers, "sites": r.sites,
            "positions": sorted({r.activations(L, s).positions for L, s in r.arrays}),
            "tokens": int(r.offsets[-1]), "bytes": r.bytes_on_disk()}


def resolve(run: str | os.PathLike, name: str | None) -> tuple[Path, Pass]:
    """(run directory, pass) for ``RUN`` and ``--pass NAME``; ``RUN`` may be a pass directory itself."""
    path = Path(run)
    if is_pass_dir(path):
        if name in (None, path.name):
            return path.parent, load_pass(path)
        raise LayerScopeError(f"{path} is pass {path.name!r}; for pass {name!r} name its run, {path.parent}")
    if name is None:
        raise LayerScopeError(f"{path}: name a prompted pass with --pass; {describe_passes(path)}")
    return path, open_pass(path, name)


def pass_report(run: str | os.PathLike, name: str | None, show_examples: int = 0,
                compare_with: str | os.PathLike | None = None) -> dict[str, Any]:
    """The report on pass ``name`` of ``run`` (``results/{run}``), as one JSON-able dict; with
    ``compare_with`` (another run, or its pass directory), the same pass there side by side."""
    run_dir, p = resolve(run, name)
    md = p.run.metadata
    rep: dict[str, Any] = {
        "run": str(run_dir), "pass": p.name, "path": str(p.path), "answers": p.answers,
        "model": md.get("model_name"), "adapter": (md.get("adapter") or {}).get("name"),
        "store": store_summary(p), "summary": stats(p.records), "splits": split_stats(p.records),
        "calibration": pass_calibration(run_dir, p),
        "examples": [example(r) for r in p.records[:show_examples]],
        "compare": None,
    }
    if compare_with is not None:
        other_dir, q = resolve(compare_with, p.name)
        check_same_questions(p, q)
        omd = q.run.metadata
        rep["compare"] = {
            "run": str(other_dir), "path": str(q.path), "model": omd.get("model_name"),
            "adapter": (omd.get("adapter") or {}).get("name"),
            "summary": stats(q.records), "splits": split_stats(q.records),
            "calibration": pass_calibration(other_dir, q),
            "changes": answer_changes(p.records, q.records),
            "activations": activation_diff(p, q),
        }
    return rep


# --- text --------------------------------------------------------------------------------------------

def _f(x: float | None, spec: str = ".3f") -> str:
    return "-" if x is None or (isinstance(x, float) and not math.isfinite(x)) else format(x, spec)


def _acc(s: dict[str, Any]) -> str:
    return f"{_f(s['accuracy'])} ({s['correct']}/{s['answered']})" if s["answered"] else "-"


def _model(m: str | None, adapter: str | None) -> str:
    return f"{m}" + (f" + adapter {adapter}" if adapter else "")


def _calibration_lines(cal: dict[str, Any] | None) -> list[str]:
    if cal is None:
        return []
    if cal["against"] is None:
        return [f"calibration  skipped: {cal['reason']}"]
    out = [f"calibration  stated confidence against pass {cal['against']}'s accuracy, {cal['questions']} questions "
           "with a known answer",
           f"  {'bin':<4} {'range':<13} {'n':>5} {'mean conf':>10} {'accuracy':>9}"]
    for r in cal["bins"]:
        lo, hi = r["range"]
        out.append(f"  {r['bin']:<4} {f'{lo:.4g}-{hi:.4g}%':<13} {r['count']:>5} {_f(r['mean_confidence'], '.1f'):>10} "
                   f"{_f(r['accuracy']):>9}")
    out.append(f"  ECE {_f(cal['ece'])} (sum over bins of n_b/N * |accuracy_b - mean conf_b/100|); mean confidence "
               f"{_f(cal['mean_confidence'], '.1f')}%, accuracy {_f(cal['accuracy'])}")
    return out


def _split_lines(splits: dict[str, dict[str, Any]], confidence: bool) -> list[str]:
    out = [f"  {'split':<14} {'questions':>9} {'accuracy':>14} {'entropy':>8} {'mass':>8}"
           + (f" {'exp. conf':>9}" if confidence else "")]
    for name, s in splits.items():
        out.append(f"  {name[:14]:<14} {s['questions']:>9} {_acc(s):>14} {_f(s['mean_entropy']):>8} "
                   f"{_f(s['mean_choice_probability_mass'], '.4f'):>8}"
                   + (f" {_f(s['mean_expected_confidence'], '.1f'):>9}" if confidence else ""))
    return out


def _indent(text: str, pad: str) -> str:
    return "\n".join(pad + line for line in text.splitlines()) if text else pad + "''"


def format_report(rep: dict[str, Any]) -> str:
    """The report as text for a terminal."""
    s, st, conf = rep["summary"], rep["store"], rep["answers"] == "confidence"
    out = [f"pass         {rep['pass']} of {rep['run']} (answers with {rep['answers']})",
           f"model        {_model(rep['model'], rep['adapter'])}",
           f"store        layers {', '.join(map(str, st['layers']))}; {', '.join(st['sites'])} at "
           f"{'/'.join(st['positions'])} positions; {st['tokens']} tokens (prompts + replies), "
           f"{human_bytes(st['bytes'])}",
           f"questions    {s['questions']} ({s['answered']} with a known answer)"]
    if s["answered"]:
        out.append(f"accuracy     {_acc(s)}")
    out.append(f"entropy      {_f(s['mean_entropy'])} nats (mean over questions)")
    out.append(f"choice mass  {_f(s['mean_choice_probability_mass'], '.4f')} (mean probability on the choices' tokens)")
    if conf:
        out.append(f"confidence   {_f(s['mean_expected_confidence'], '.1f')}% (mean expected confidence)")
    out.append("answers      " + ", ".join(f"{k} {v}" for k, v in s["answers"].items()) + " (parsed)")
    out.append("per split")
    out += _split_lines(rep["splits"], conf)
    out += _calibration_lines(rep["calibration"])
    for e in rep["examples"]:
        probs = "  ".join(f"{c} {p:.3f}" for c, p in zip(e["choices"] or [], e["probs"] or []))
        verdict = {True: "right", False: "wrong", None: ""}[e["is_correct"]]
        out += [f"\n[{e['index']}] {e['question_id']} ({e['split']})", "  prompt:", _indent(e["prompt_text"], "    "),
                f"  reply:  {e['output_text']!r}", f"  probs:  {probs}",
                f"  parsed {e['parsed_answer']} (argmax {e['argmax_answer']})"
                + (f", correct {e['correct_answer_letter']}" if e["correct_answer_letter"] and not conf else "")
                + (f": {verdict}" if verdict else "") + f"; entropy {_f(e['entropy'])}"
                + (f"; expected confidence {_f(e['expected_confidence'], '.1f')}%" if conf else "")]
    c = rep["compare"]
    if c is None:
        return "\n".join(out)
    a_s, b_s = s, c["summary"]
    out += ["", f"compare      A {rep['path']}  ({_model(rep['model'], rep['adapter'])})",
            f"             B {c['path']}  ({_model(c['model'], c['adapter'])})",
            f"  {'':<24} {'A':>16} {'B':>16}"]
    rows = [("accuracy", _acc(a_s), _acc(b_s)),
            ("mean entropy", _f(a_s["mean_entropy"]), _f(b_s["mean_entropy"])),
            ("mean choice mass", _f(a_s["mean_choice_probability_mass"], ".4f"),
             _f(b_s["mean_choice_probability_mass"], ".4f"))]
    if conf:
        rows.append(("mean expected confidence", _f(a_s["mean_expected_confidence"], ".1f"),
                     _f(b_s["mean_expected_confidence"], ".1f")))
        ece = lambda cal: _f(cal.get("ece")) if cal and cal.get("against") else "-"  # noqa: E731
        rows.append(("ECE", ece(rep["calibration"]), ece(c["calibration"])))
    out += [f"  {k:<24} {x:>16} {y:>16}" for k, x, y in rows]
    ch = c["changes"]
    out.append(f"answers      {ch['changed']} of {ch['questions']} questions changed their parsed answer"
               + (f"; right -> wrong {ch['right_to_wrong']}, wrong -> right {ch['wrong_to_right']} "
                  f"(of {ch['known']} with a known answer)" if ch["known"] else "")
               + (f"; mean confidence change {_f(ch['mean_confidence_change'], '+.1f')} points"
                  if ch["mean_confidence_change"] is not None else ""))
    for x in ch["first"]:
        out.append(f"  {x['question_id']}: {x['a']} -> {x['b']}" + (f" (correct {x['correct']})" if x["correct"]
                                                                     and not conf else ""))
    if ch["changed"] > len(ch["first"]):
        out.append(f"  ... {ch['changed'] - len(ch['first'])} more (--json lists the first {len(ch['first'])})")
    act = c["activations"]
    if act["skipped"]:
        out.append(f"activations  skipped: {act['skipped']}")
        return "\n".join(out)
    out.append("activations  A vs B at each question's answer position, all questions; cosine = mean cos(a, b); "
               "rel_l2 = ||a - b|| / ||a||")
    if act["note"]:
        out.append(f"  ({act['note']})")
    out.append(f"  {'array':<22} {'n':>5} {'cosine':>9} {'rel_l2':>9} {'|a|':>10} {'|b|':>10} {'rel':>8}")
    for r in act["rows"]:
        rel = _f(None if r["norm_change_rel"] is None else 100 * r["norm_change_rel"], "+.2f")
        out.append(f"  {'layer_%02d/%s' % (r['layer'], r['site']):<22} {r['n']:>5} {_f(r['cosine'], '.6f'):>9} "
                   f"{_f(r['rel_l2'], '.4g'):>9} {_f(r['norm_a'], '.4g'):>10} {_f(r['norm_b'], '.4g'):>10} "
                   f"{rel + '%':>8}")
    return "\n".join(out)


def to_json(rep: dict[str, Any]) -> str:
    """The report as one line of JSON (NaN and inf as null)."""
    return json.dumps(_finite(rep))


def _finite(x: Any) -> Any:
    if isinstance(x, float):
        return x if math.isfinite(x) else None
    if isinstance(x, dict):
        return {k: _finite(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [_finite(v) for v in x]
    if isinstance(x, np.generic):
        return _finite(x.item())
    return x
