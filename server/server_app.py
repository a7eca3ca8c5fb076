"""fedsynth ServerApp: trains the global latent diffusion model across the sites, then synthesizes a cohort.

Thin by design: the rounds live in `server.training`, synthesis in `server.synthesis`.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path

from flwr.app import Context
from flwr.serverapp import Grid, ServerApp

from common.config import RunConfig
from server.synthesis import SynthesisRequest, synthesize_cohort
from server.training import Federation

app = ServerApp()
logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(levelname)s %(message)s")
log = logging.getLogger("fedsynth.server")


@app.main()
def main(grid: Grid, context: Context) -> None:
    run = RunConfig.from_flwr(context.run_config)
    federation = Federation(grid, run, progress=lambda m: log.info("%s", m))
    checkpoint = federation.run_rounds()
    if checkpoint is None or run.synthesize_per_class <= 0:
        return
    run_dir = Path(run.run_dir)
    cohort = run_dir / "cohort"
    if cohort.exists():
        log.info("cohort already exists at %s; not overwriting", cohort)
        return
    privacy = json.loads((run_dir / "privacy.json").read_text()) if (run_dir / "privacy.json").exists() else None
    synthesize_cohort(
        SynthesisRequest(checkpoint=checkpoint, out_dir=cohort, per_class=run.synthesize_per_class, seed=run.seed),
        privacy=privacy, progress=lambda m: log.info("%s", m),
    )
