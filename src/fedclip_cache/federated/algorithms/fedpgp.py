"""FedPGP: a global prompt plus a personalised low-rank prompt per client (Cui et al., "Harmonizing Generalization
and Personalization in Federated Prompt Learning", ICML 2024; official code github.com/TianyuCuiOvO/FedPGP).

Every client's context is ``sigma + U V`` (``federated/pgp.py``): the server averages ``sigma`` (the global prompt,
n_ctx x width: all that travels, each way); ``U`` (n_ctx x rank) and ``V`` (rank x width) never leave the client.
A sampled client trains sigma, U and V together from the current global sigma and its own U, V, on CoOp's
cross-entropy plus ``--pgp-mu`` times the CLIP-guided contrastive term (temperature ``--pgp-temp``). After the
server's average every client holds the new global sigma (official ``federated_main.py``: the average is written
into every client's state) and is scored with ``sigma + U V`` of its own: a personal method, evaluated per client.

State: ``server = {"sigma": (E, n_ctx, width)}``, ``clients = {"sigma", "U", "V"}`` stacked over lanes (sigma: the
experiment's global prompt as each client holds it). :data:`GLOBAL_PARAMS` / :data:`PERSONAL_PARAMS` name the
communicated and the kept tensors (what a deployment sends: ``sigma`` only).
"""
from __future__ import annotations

from .base import Algorithm, TrainState, register_algorithm
from .prompt import PROMPT_OPTIONS

# Registry rule: no ``import torch`` here (the CLI imports algorithms for --help).

GLOBAL_PARAMS = ("sigma",)  # sent by the sampled clients, averaged by the server, sent back to every client
PERSONAL_PARAMS = ("U", "V")  # kept by each client, never sent
PGP_OPTIONS = ("pgp_rank", "pgp_mu", "pgp_temp")


@register_algorithm
class FedPGP(Algorithm):
    name = "fedpgp"
    summary = "global prompt sigma (FedAvg) + personal low-rank prompt U V per client, CLIP-guided contrastive term"
    reference = ("Cui et al., Harmonizing Generalization and Personalization in Federated Prompt Learning, ICML "
                 "2024 (github.com/TianyuCuiOvO/FedPGP)")
    prompts = True
    personal = True  # every client is scored with its own sigma + U V
    communicates = True  # ... but sigma is averaged every round
    uses = tuple(n for n in PROMPT_OPTIONS if n != "prompt_csc") + PGP_OPTIONS

    def learner(self, base):
        """The prompt parameters this method trains over the frozen text tower ``base`` (prompts.PromptLearner)."""
        from ..pgp import PGPLearner

        return PGPLearner(base, self.cfg.pgp_rank, self.cfg.pgp_mu, self.cfg.pgp_temp)

    def init_state(self, server, clients) -> TrainState:
        """Round 0: the server holds sigma; every client starts from the experiment's sigma, U and V (official:
        every client loads the one initial prompt learner)."""
        return TrainState(server={n: server[n] for n in GLOBAL_PARAMS}, clients=clients)

    def run_round(self, state: TrainState, ctx) -> TrainState:
        trained, _ = ctx.train(ctx.select(state.clients))
        state.clients = ctx.scatter(state.clients, trained)
        averaged = ctx.average({n: trained[n] for n in GLOBAL_PARAMS})
        state.server, state.extra = self.server_update(state.server, averaged, state.extra, ctx.rnd)
        for n in GLOBAL_PARAMS:  # every client, sampled or not, now holds the new global prompt
            state.clients[n] = state.server[n][ctx.lane_exp]
        return state
