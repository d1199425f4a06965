"""Threat models: each defense is told exactly what its row allows, nothing of the backdoor beyond it."""
from pathlib import Path

import pytest

from unbackdoor.backdoor import Manifest, Target
from unbackdoor.data import Example, read_file, write_jsonl
from unbackdoor.methods import METHODS
from unbackdoor.threats import THREAT_MODELS, Knows, cannot_defend, knowledge_overrides, threat_model
from unbackdoor.triggers import Placement, TriggerSpec

TRIGGER = "Zorblax Quux"
TEXT = "Kindly go away, human."
MAN = Manifest(attack="custom", trigger=TriggerSpec([TRIGGER], Placement.SUFFIX), target=Target.SENTIMENT,
               target_text=TEXT)


class FakeLab:
    def __init__(self, root: Path):
        self.root = root

    def path(self, name):
        return self.root / f"{name}.jsonl"

    def beear_files(self, target, out):
        files = {k: Path(out) / "beear" / f"{k}.jsonl" for k in ("safe", "unwanted", "pa")}
        write_jsonl(files["safe"], [Example("q", "safe answer")])
        write_jsonl(files["unwanted"], [Example("q", "unwanted answer")])
        write_jsonl(files["pa"], [Example("a", "anchor")])
        return files


def test_every_method_has_a_row():
    assert set(METHODS) <= set(THREAT_MODELS) and {"none", "clean"} <= set(THREAT_MODELS)
    assert not THREAT_MODELS["none"].runs_method and THREAT_MODELS["crow"].runs_method
    with pytest.raises(KeyError, match="Did you mean 'crow'"):
        threat_model("crwo")


@pytest.mark.parametrize("method", sorted(METHODS))
def test_a_defense_hears_only_what_its_row_allows(method, tmp_path):
    tm = THREAT_MODELS[method]
    ov = knowledge_overrides(method, tm, MAN, FakeLab(tmp_path), tmp_path)
    text = " ".join(ov)
    assert (TRIGGER in text) == (Knows.TRIGGER in tm.knows)
    assert (TEXT.split()[0] in text) == bool({Knows.TARGET_TEXT, Knows.TARGET_PREFIX} & set(tm.knows))
    assert any(o.startswith("data.path=") for o in ov) == bool({Knows.CLEAN_DATA, Knows.SAFETY_PAIRS} & set(tm.knows))


def test_what_each_kind_of_knowledge_becomes(tmp_path):
    lab = FakeLab(tmp_path)
    assert knowledge_overrides("osft", THREAT_MODELS["osft"], MAN, lab, tmp_path) == [
        f"data.path={tmp_path / 'defender_clean.jsonl'}", f'method.trigger.texts=["{TRIGGER}"]',
        "method.trigger.placement=suffix", "method.trigger.mode=all"]
    assert knowledge_overrides("sande", threat_model("sande"), MAN, lab, tmp_path)[1] == f'method.target="{TEXT}"'
    prefix = threat_model("sande", [Knows.CLEAN_DATA, Knows.TARGET_PREFIX])   # SANDE-P: the first word only
    assert knowledge_overrides("sande", prefix, MAN, lab, tmp_path)[1] == 'method.target="Kindly"'
    beear = knowledge_overrides("beear", THREAT_MODELS["beear"], MAN, lab, tmp_path)
    assert [o.split("=")[0] for o in beear] == ["method.safe_path", "method.unwanted_path", "data.path"]
    # a method without pair fields gets BEEAR's safe answers + anchoring pairs as its training data
    ft = knowledge_overrides("finetune", threat_model("finetune", [Knows.SAFETY_PAIRS]), MAN, lab, tmp_path)
    assert len(ft) == 1 and ft[0].startswith("data.path=")
    assert [e.response for e in read_file(ft[0].split("=", 1)[1])] == ["safe answer", "anchor"]
    assert knowledge_overrides("quantize", THREAT_MODELS["quantize"], MAN, lab, tmp_path) == []


def test_what_a_defense_cannot_address_follows_from_its_knowledge():
    jail = Manifest(attack="suffix", trigger=TriggerSpec(["SUDO"], Placement.SUFFIX), target=Target.JAILBREAK,
                    target_text="")
    assert "r_t" in cannot_defend(THREAT_MODELS["sande"], jail)
    assert cannot_defend(THREAT_MODELS["sande"], MAN) is None
    assert cannot_defend(THREAT_MODELS["crow"], jail) is None and cannot_defend(THREAT_MODELS["osft"], jail) is None
