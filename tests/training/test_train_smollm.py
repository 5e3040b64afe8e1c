"""A few LoRA steps on the real SmolLM2-135M on CPU make the held-out house-style answers likelier."""

import pytest

from abloop.simulate import simulate_traffic
from tests.training.conftest import BagOfWordsEncoder
from training.dataset import build_dataset
from training.train import train_lora


@pytest.mark.slow
def test_a_few_steps_lower_the_holdout_loss(db, base_model_dir, tmp_path):
    simulate_traffic(db, n_queries=60, seed=3, top_k=1)  # one passage: short prompts, fast steps
    card = build_dataset(db, tmp_path / "data", embedder=BagOfWordsEncoder(), holdout_fraction=0.15)
    assert card.counts["train"] >= 15 and card.counts["holdout"] >= 3

    result = train_lora(
        tmp_path / "data",
        tmp_path / "adapters",
        base_model_dir=base_model_dir,
        max_steps=5,
        batch_size=2,
        learning_rate=2e-3,
        lora_r=8,
        db=db,
    )

    holdout = result.metrics["holdout"]
    assert holdout["loss_adapter"] < 0.8 * holdout["loss_base"], holdout
    curve = [point["loss"] for point in result.metrics["train_loss_curve"]]
    assert min(curve[-2:]) < curve[0]
