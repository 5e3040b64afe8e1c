"""The operator report: what it gathers, that it renders self-contained and escaped, and the markdown twin."""

from __future__ import annotations

import json
import re
from datetime import timedelta

from sqlalchemy import insert, select, update

import experiment
from experiment import lifecycle
from experiment.report import SIMULATED_BANNER, gather, render_html, to_markdown, write_report
from experiment.report.markdown import _md_text
from experiment.status import describe, render
from store.db import Database
from store.models import Adapter, Experiment, ExperimentEvent, Feedback, SearchEvent, new_id, utcnow
from tests.experiment import traffic
from tests.experiment.traffic import ArmBehaviour

SCRIPT = "<script>alert('pwned')</script>"
PIXEL = "![pixel](https://tracker.example/p.png)"  # markdown that a viewer would fetch
PLAN = {"steps": [0.2, 0.5], "min_users_per_step": 100, "min_hours_per_step": 0, "auto_promote": False}
EVAL = {  # the shape of training.evaluate.EvalReport.to_dict()
    "adapter": "lora-v7", "passed": True, "reasons": [],
    "holdout": {"n": 40, "tokens": 4000, "loss_base": 2.41, "loss_adapter": 1.87, "perplexity_base": 11.1,
                "perplexity_adapter": 6.5, "loss_improvement": 0.224},
    "answers": {"n": 32, "rouge_l_base": 0.21, "rouge_l_adapter": 0.44, "similarity_base": 0.61,
                "similarity_adapter": 0.78},
    "thresholds": {"min_loss_improvement": 0.01, "answer_tolerance": 0.0},
}
_REMOTE = re.compile(r"""(?:\b(?:src|href|action|xlink:href|poster|data)\s*=\s*["']?\s*(?:https?:)?//)"""
                     r"""|url\(\s*["']?\s*(?:https?:)?//|@import""", re.IGNORECASE)


def populate(db: Database, *, prefix: str = "sim-user", candidate_up: float = 0.75) -> str:
    """A realistic experiment: an adapter that passed its gate, a two-step rollout, traffic, answers with feedback."""
    traffic.start(db, share=0.0)
    with db.session() as session:
        adapter = Adapter(name="lora-v7", base_model="SmolLM2-135M-Instruct", path="/adapters/lora-v7",
                          dataset_hash="9f2c1e7ab44d", eval_metrics=EVAL,
                          train_metrics={"train_rows": 360, "holdout_rows": 40, "train_loss_final": 1.52})
        session.add(adapter)
        session.flush()
        adapter_id = adapter.id
    running = lifecycle.start_candidate(db, base_url="http://gpu-1:8000/v1", model="lora-v7", adapter_id=adapter_id,
                                        share=0.0, reason="retrained on feedback")
    lifecycle.set_rollout(db, running.id, PLAN)
    better = ArmBehaviour(up=candidate_up, rating_mean=3.5)
    same = ArmBehaviour(up=0.5, rating_mean=3.2)
    traffic.write(db, running, users=700, control=same, candidate=better, share=0.2, prefix=prefix, seed=1)
    assert experiment.evaluate(db, running.id).decision["rollout"]["did"] == "advanced"  # to the 50% step
    traffic.write(db, running, users=1300, control=same, candidate=better, share=0.5, prefix=prefix, seed=2,
                  first_user=700)
    _answers(db, running.id, prefix)
    _spread_over(db, timedelta(hours=36))
    return running.id


def _spread_over(db: Database, span: timedelta) -> None:
    """Stretch everything written in the last seconds over `span`, order kept, as if the experiment ran that long.

    Helpers write thousands of rows within a second; the charts and phases need time between them.
    """
    tables = ((Experiment, Experiment.started_at), (ExperimentEvent, ExperimentEvent.ts), (SearchEvent, SearchEvent.ts),
              (Feedback, Feedback.ts))
    with db.session() as session:
        rows = sorted(((ts, rank, model, row_id) for rank, (model, column) in enumerate(tables)
                       for row_id, ts in session.execute(select(model.id, column))), key=lambda r: (r[0], r[1]))
        start, step = utcnow() - span, span / max(len(rows), 1)
        moved: dict[type, list[dict]] = {model: [] for model, _column in tables}
        for n, (_ts, _rank, model, row_id) in enumerate(rows):
            moved[model].append({"id": row_id, "started_at" if model is Experiment else "ts": start + step * n})
        for model, values in moved.items():
            session.execute(update(model), values)  # bulk update by primary key


def _answers(db: Database, experiment_id: str, prefix: str) -> None:
    moment = utcnow()
    events, feedback = [], []
    pairs = [
        ("How do I sort a list in place?", "Use list.sort(); it sorts in place and returns None.",
         f"Answer: call list.sort() {SCRIPT}\nSource: Sorting HOW TO"),
        ("What does the with statement do?", f"It wraps a block with a context manager's enter and exit. {PIXEL}",
         "Answer: it runs __enter__ and __exit__ around the block.\nSource: The with statement"),
        ("Is a tuple mutable?", "No. " + "Tuples are immutable sequences. " * 30,
         "Answer: no, tuples are immutable.\nSource: Sequence types"),
    ]
    for n, (query, control, candidate) in enumerate(pairs):
        for arm, answer in (("control", control), ("candidate", candidate)):
            event_id = new_id()
            moment += timedelta(milliseconds=5)
            events.append({"id": event_id, "ts": moment, "user_id": f"{prefix}-ex-{n}-{arm}",
                           "experiment_id": experiment_id, "arm": arm, "served_arm": arm, "model": arm,
                           "query": query, "messages": [], "retrieved": {}, "answer": answer, "status": "ok",
                           "timings": {"total": 90.0}, "tokens_in": 10, "tokens_out": 12})
            if arm == "candidate":
                feedback.append({"id": new_id(), "event_id": event_id, "ts": moment, "thumbs": "up", "rating": 5,
                                 "corrected_answer": None})
            elif n == 0:
                feedback.append({"id": new_id(), "event_id": event_id, "ts": moment, "thumbs": "down",
                                 "rating": None, "corrected_answer": "Answer: list.sort() <b>sorts</b> in place."})
    with db.session() as session:
        session.execute(insert(SearchEvent), events)
        session.execute(insert(Feedback), feedback)


def _sections(page: str) -> list[str]:
    return re.findall(r"<h2>(.*?)</h2>", page)


def test_the_report_shows_the_verdict_charts_phases_and_examples(sqlite_db, tmp_path):
    experiment_id = populate(sqlite_db)
    bundle = gather(sqlite_db)
    analysis = bundle["analysis"]
    assert bundle["experiment"]["id"] == experiment_id and bundle["selection"] == "the running experiment"
    assert [p["share"] for p in analysis["phases"]] == [0.0, 0.2, 0.5]
    assert [t["kind"] for t in bundle["transitions"]] == ["start", "rollout_step", "rollout_step"]
    assert len(bundle["timeline"]) == 12
    assert bundle["timeline"][-1]["users"] == [analysis["arms"][arm]["users"] for arm in ("control", "candidate")]
    assert bundle["examples"]["mode"] == "pairs" and len(bundle["examples"]["rows"]) == 3
    assert bundle["offline_gate"]["name"] == "lora-v7" and bundle["offline_gate"]["eval_metrics"]["passed"]
    assert bundle["simulated"]["all"] and bundle["simulated"]["simulated_users"] == 2006

    page = render_html(bundle)
    assert render_html(json.loads(json.dumps(bundle))) == page  # JSON-ready: a stored bundle renders the same
    action = analysis["decision"]["action"]
    assert action == "promote", analysis["decision"]
    assert "Promote the candidate" in page and f"<code>{action}</code>" in page
    assert _sections(page) == ["Verdict", "Primary metric over time", "Metrics per arm", "Guardrails",
                               "Rollout &amp; transitions", "Sample-ratio check per phase",
                               "Example answers side by side", "Offline gate", "Method notes"]
    charts = page.count('<svg class="chart"')
    assert charts == 2 and page.count("<svg") >= charts + len([m for m in analysis["metrics"].values() if m])
    assert page.count("<polygon") >= 3  # the bands: two arms and the difference
    # The step to 50% on both charts; the step to 20% came before the first user, left of the first look.
    assert page.count('class="marker"') == 2 and page.count("→ 50%</text>") == 2
    assert "fixed-horizon p (reference only)" in page and "always-valid 95% interval" in page
    assert "phase 3" in page and "step 2 of 2 (50%): step 1 had" in page and "auto-promote no" in page
    assert "Last decision recorded on the experiment" in page
    left_out = analysis["assignment"]["users_left_out"]
    assert 100 < left_out < 300  # the 20% step's users with buckets 2000..4999 (about 30% of 700)
    assert f"{left_out:,} users left out whose bucket a share change moved; 0 users seen in both arms" in page
    assert "0% → 20%" in page and "20% → 50%" in page
    assert "lora-v7" in page and "gate passed" in page and "1.8700" in page
    assert "How do I sort a list in place?" in page and "…" in page  # the long answer is truncated
    assert SIMULATED_BANNER in page and "SIMULATED feedback" in page and "simulated user" in page
    assert "user is the unit" in page.lower() and "delta method" in page and "CUPED" in page


def test_user_text_is_escaped_and_nothing_is_fetched(sqlite_db):
    populate(sqlite_db)
    page = render_html(gather(sqlite_db, points=3))
    assert "<script" not in page.lower()  # the page has no script of its own, so any is an escaping failure
    assert "&lt;script&gt;alert(&#x27;pwned&#x27;)&lt;/script&gt;" in page
    assert "<b>sorts</b>" not in page and "&lt;b&gt;sorts&lt;/b&gt;" in page
    assert not _REMOTE.findall(page)
    assert "<link" not in page and "<img" not in page and "<iframe" not in page
    assert "http://gpu-1:8000/v1" in page  # the candidate's endpoint is shown as text, not linked


def test_real_users_get_no_simulation_banner(sqlite_db):
    populate(sqlite_db, prefix="user")
    page = render_html(gather(sqlite_db, points=2))
    assert "SIMULATED" not in page and "simulated user" not in page


def test_after_a_promotion_the_report_is_about_the_last_comparison(sqlite_db, tmp_path):
    experiment_id = populate(sqlite_db)
    lifecycle.conclude(sqlite_db, experiment_id, outcome="promoted", decision={"action": "promote",
                                                                              "reason": "operator approved"})
    bundle = gather(sqlite_db, points=3)
    assert bundle["experiment"]["id"] == experiment_id and bundle["experiment"]["status"] == "promoted"
    assert "ended experiment" in bundle["selection"]
    page = render_html(bundle)
    assert "operator approved" in page and "This experiment ended as <b>promoted</b>" in page
    path = write_report(sqlite_db, out_dir=tmp_path / "reports")
    assert path.name == f"experiment-{experiment_id[:8]}.html"
    assert (tmp_path / "reports" / "latest.html").read_text(encoding="utf-8") == path.read_text(encoding="utf-8")


def test_markdown_has_the_verdict_and_the_per_arm_table(sqlite_db):
    populate(sqlite_db)
    bundle = gather(sqlite_db, points=3)
    text = to_markdown(bundle)
    assert "## Verdict" in text and "**Promote the candidate** (`promote`)" in text
    assert _md_text(bundle["analysis"]["decision"]["reason"]) in text  # its brackets escaped: no link
    control = bundle["experiment"]["control"]["model"]
    assert f"| figure | control ({control}) | candidate (lora-v7) |" in text and "| users |" in text
    assert "fixed-horizon p (reference only)" in text and "## Sample-ratio check per phase" in text
    assert SIMULATED_BANNER in text and "<script" not in text and "&lt;script>alert" in text
    assert PIXEL not in text and r"\!\[pixel\](https://tracker.example/p.png)" in text
    assert r"\_\_enter\_\_" in text  # no bold from a model's dunder names
    assert "## Offline gate" in text and "gate passed" in text


def test_operator_text_makes_no_link_or_image_and_a_password_in_an_endpoint_is_hidden(sqlite_db):
    """A model name, a transition's reason, an adapter's name and its gate's reasons come through the admin API
    and the registry: in the markdown they are text, never a link or an image a viewer would fetch."""
    populate(sqlite_db)
    hostile = f"lora {PIXEL} [click](https://evil.example/)"
    running = lifecycle.start_candidate(sqlite_db, base_url="http://admin:s3cretpw@gpu-1:8000/v1", model=hostile,
                                        share=0.5, reason=f"because {PIXEL}")
    traffic.write(sqlite_db, running, users=300, seed=3)
    with sqlite_db.session() as session:
        adapter = session.query(Adapter).one()
        adapter.name, adapter.eval_metrics = hostile, dict(EVAL, reasons=[f"see {PIXEL}"])
        session.get(Experiment, running.id).candidate_adapter_id = adapter.id
    bundle = gather(sqlite_db, experiment_id=running.id, points=3)
    text = to_markdown(bundle)
    assert PIXEL not in text and " [click](" not in text and r"\[click\](https://evil.example/)" in text
    assert text.count(r"\!\[pixel\](https://tracker.example/p.png)") >= 4  # model, reason, adapter, gate
    page = render_html(bundle)
    assert "s3cretpw" not in page and "http://admin:***@gpu-1:8000/v1" in page
    assert "s3cretpw" not in render(describe(sqlite_db, running.id))


def test_an_empty_store_and_a_young_experiment_still_render(sqlite_db, tmp_path):
    bundle = gather(sqlite_db)
    assert bundle["experiment"] is None and bundle["analysis"]["decision"]["action"] == "not_enough_data"
    page = render_html(bundle)
    assert "Not enough data" in page and "no experiment in the store" in page and "<svg" not in page
    assert "Not enough data" in to_markdown(bundle)
    assert write_report(sqlite_db, out_dir=tmp_path).name == "experiment-none.html"

    running = traffic.start(sqlite_db, share=0.5)
    traffic.write(sqlite_db, running, users=6)
    young = gather(sqlite_db, points=4)
    assert young["analysis"]["decision"]["action"] == "not_enough_data"
    page = render_html(young)
    assert "Not enough data" in page and "No offline gate" not in page and "Sample-ratio check per phase" in page
    assert "not a registered adapter" in page and "No answered request logged yet" in page


def test_a_prompt_experiment_names_the_candidate_template(sqlite_db):
    """Same model on both arms, another prompt on the candidate: status and report say which template."""
    from experiment.status import describe, render
    from store import prompts

    template = prompts.new_version(sqlite_db, name=prompts.DEFAULT_NAME, system_prompt="Answer in one line.",
                                   template=prompts.DEFAULT_TEMPLATE, few_shot=[], activate=False)
    running = traffic.start(sqlite_db)
    tried = lifecycle.start_candidate(sqlite_db, base_url=running.control_base_url, model=running.control_model,
                                      prompt_template_id=template.id, share=0.5)
    label = f"{running.control_model} with prompt template {template.id[:8]}"
    status = render(describe(sqlite_db, tried.id))
    assert f"candidate: {label}" in status and f"control:   {running.control_model} @" in status
    assert "with prompt template" not in status.split("candidate:")[0]  # control keeps the active template
    page = render_html(gather(sqlite_db, tried.id))
    assert label in page and page.count("with prompt template") == page.count(label)
