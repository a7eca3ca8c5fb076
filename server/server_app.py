"""fedsynth ServerApp: trains the global latent diffusion model across the sites, synthesizes a cohort, and has the
sites audit it. Thin by design: rounds live in `server.training`, synthesis in `server.synthesis`, the audit
round in `server.audit`.
"""

from __future__ import annotations

import logging
from pathlib import Path

from flwr.app import Context
from flwr.serverapp import Grid, ServerApp

from common import ensure_fedsynth_packages
from common.config import RunConfig
from common.noise import silence_known_noise
from server.run_folder import RunFolder
from server.synthesis import SynthesisRequest, synthesize_cohort
from server.training import Federation, wait_for_sites

app = ServerApp()
logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(levelname)s %(message)s")
logging.getLogger("httpx").setLevel(logging.WARNING)  # one line per Flower HTTP poll otherwise
logging.getLogger(
    "flwr"
).propagate = False  # Flower prints its own records; the root handler doubled each
silence_known_noise()
log = logging.getLogger("fedsynth.server")


def _say(message: str) -> None:
    log.info("%s", message)


@app.main()
def main(grid: Grid, context: Context) -> None:
    ensure_fedsynth_packages()
    run = RunConfig.from_flwr(context.run_config)
    folder = RunFolder(Path(run.run_dir))
    if run.mode == "audit":
        from server.audit import run_audit_round

        wait_for_sites(grid, run.min_sites, run.round_timeout)
        run_audit_round(
            grid,
            Path(run.cohort_dir),
            Path(run.checkpoint),
            Path(run.cohort_dir).parent / "audit",
            timeout=run.round_timeout,
            progress=_say,
            oversample=run.audit_oversample,
        )
        return
    checkpoint = Federation(grid, run, progress=_say).run_rounds()
    if checkpoint is None or run.synthesize_per_class <= 0:
        return
    cohort = folder.cohort
    if cohort.exists():
        _say(f"cohort already exists at {cohort}; not overwriting it")
    else:
        privacy = folder.read_privacy()
        synthesize_cohort(
            SynthesisRequest(
                checkpoint=checkpoint,
                out_dir=cohort,
                per_class=run.synthesize_per_class,
                seed=run.seed,
            ),
            privacy=privacy,
            progress=_say,
        )
    if run.audit:
        from server.audit import run_audit_round

        record = folder.read_record()
        run_audit_round(
            grid,
            cohort,
            checkpoint,
            folder.audit,
            timeout=run.round_timeout,
            run_record=record,
            progress=_say,
            oversample=run.audit_oversample,
        )
