"""Bring a shipped prior's recorded fine-tuning settings up to date with its preset.

    python scripts/refresh_prior_config.py digits manywell32

A prior checkpoint carries the resolved preset it was pretrained under, and `rtbcli finetune
--prior X` without `--preset` fine-tunes with that preset's [finetune] section. When a shipped
preset's fine-tuning, evaluation or reproduce settings are tuned after its prior was made, the
prior would hand on the old ones. This rewrites the recorded config from the current preset for
every section except those that made the prior (`pretrain`, `prior_data`, `sampler`), keeps the
weights and every other metadata key (the provenance of the run) as they are, and records what
it did under `config_refreshed`. The test `test_shipped_priors_carry_their_preset` fails when a
refresh is due.
"""

from __future__ import annotations

import argparse
import datetime as _dt
import json
import sys

from safetensors import safe_open
from safetensors.torch import load_file

from rtbcli.checkpoint import save_checkpoint
from rtbcli.config import Preset
from rtbcli.presets_loader import load_preset
from rtbcli.reproduce import shipped_prior
from rtbcli.script_support import run_script

KEEP = ("pretrain", "prior_data", "sampler")  # the sections that made the prior: never rewritten


def refreshed(recorded: Preset, current: Preset) -> Preset:
    data = current.model_dump()
    for section in KEEP:
        data[section] = recorded.model_dump()[section]
    return Preset.model_validate(data)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("presets", nargs="+", help="shipped presets whose prior to refresh")
    args = ap.parse_args()
    for name in args.presets:
        preset, _ = load_preset(name)
        path = shipped_prior(preset.reproduce.shipped_prior)
        with safe_open(str(path), "pt") as f:
            meta = dict(f.metadata())
        recorded = Preset.model_validate_json(meta["config"])
        new = refreshed(recorded, preset)
        if new == recorded:
            print(f"{path.name}: up to date")
            continue
        history = json.loads(meta.get("config_refreshed", "[]"))
        history.append(
            {
                "date": _dt.date.today().isoformat(),
                "from_preset": name,
                "sections": sorted(k for k in new.model_dump() if new.model_dump()[k] != recorded.model_dump()[k]),
            }
        )
        meta.update(config=new.model_dump_json(), config_refreshed=json.dumps(history))
        save_checkpoint(path, load_file(str(path)), meta)
        print(f"{path.name}: refreshed {', '.join(history[-1]['sections'])}")


if __name__ == "__main__":
    sys.exit(run_script(main))
