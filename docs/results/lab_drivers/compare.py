"""Per-cell comparison of the old benchmark drivers' rows with the bench configs' rows (same lab, same seeds)."""
import json
import sys
from pathlib import Path

KEYS = ("asr_with_trigger", "asr_without_trigger", "benign_accuracy", "harmful_refusal", "over_refusal")

def old_rows(kind, d):
    d = Path(d)
    if kind in ("crow", "sande"):
        rows = json.loads((d / "rows.json").read_text())
        for r in rows:
            yield (r["arch"], r["attack"], r["target"], r["seed"], r["defense"]), r
    else:
        for p in d.glob("*/main/*/cell.json"):
            c = json.loads(p.read_text())
            for name, new in (("none", "none"), ("beear", "beear"), ("finetune", "finetune-beear")):
                if name in c:
                    r = dict(c[name])
                    if name == "beear":
                        r["entrapment_first"] = r["entrap"][0] if r.get("entrap") else None
                        r["entrapment_last"] = r["after_outer"][-1] if r.get("after_outer") else None
                        r["steps"] = r.get("outer_steps")
                    if name == "finetune":
                        r["steps"] = r.get("outer_steps")
                    yield (c["arch"], c["attack"], c["target"], c["seed"], new), r

def compare(kind, old_dir, new_dir):
    new = {(r["arch"], r["attack"], r["target"], r["seed"], r["defense"]): r
           for r in json.loads((Path(new_dir) / "results.json").read_text())}
    extra = {"sande": ("asr_with_parrot", "simulation_success_rate"),
             "beear": ("entrapment_first", "entrapment_last", "steps")}.get(kind, ())
    n = same = 0
    diffs = []
    for key, o in old_rows(kind, old_dir):
        r = new.get(key)
        if r is None:
            diffs.append((key, "missing in the bench rows"))
            continue
        for k in KEYS + extra:
            if k not in o:
                continue
            n += 1
            if o[k] == r.get(k) or (o[k] is not None and r.get(k) is not None and abs(o[k] - r[k]) < 1e-12):
                same += 1
            else:
                diffs.append((key, k, o[k], r.get(k)))
    cells = len(list(old_rows(kind, old_dir)))
    print(f"{kind}: {cells} cells, {n} numbers compared, {same} identical, {len(diffs)} differ")
    for d in diffs[:20]:
        print("   ", d)
    return not diffs

if __name__ == "__main__":
    ok = compare(sys.argv[1], sys.argv[2], sys.argv[3])
    sys.exit(0 if ok else 1)
