"""The search algorithms `tune.algorithm` names, and what each one is, in one place. The schema's choices, the
config checks, the runner, the report and `bench tune` read it; tune/search.py builds each one (`BUILDERS`, which
a test checks against this table). Plain data: importing it costs nothing and pulls in no search library."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Algorithm:
    name: str
    # the pip extra (raytune_ft[EXTRA]) and the modules it provides; None: Ray Tune alone
    extra: tuple[str, tuple[str, ...]] | None = None
    # a population scheduler (PBT, PB2): trials exploit each other's checkpoints and change hyper-parameters
    # while running; it is the trial scheduler itself
    perturbs: bool = False
    # samples conditional search-space keys (`when`): Tune's variant generator resolves `sample_from` after plain
    # domains, Optuna defines the space by running code
    conditional: bool = False
    # the trial scheduler it must run with, if any
    scheduler: str | None = None
    # models continuous ranges only (uniform, loguniform, int)
    continuous_only: bool = False


ALGORITHMS = {
    a.name: a
    for a in (
        Algorithm("random", conditional=True),
        Algorithm("grid"),
        Algorithm("optuna", extra=("optuna", ("optuna",)), conditional=True),
        Algorithm("hyperopt", extra=("hyperopt", ("hyperopt",))),
        Algorithm("bohb", extra=("bohb", ("hpbandster", "ConfigSpace")), scheduler="hyperband"),
        Algorithm("pbt", perturbs=True),
        Algorithm("pb2", extra=("pb2", ("sklearn",)), perturbs=True, continuous_only=True),
    )
}
NAMES = tuple(ALGORITHMS)


def perturbs(name: str) -> bool:
    return ALGORITHMS[name].perturbs
