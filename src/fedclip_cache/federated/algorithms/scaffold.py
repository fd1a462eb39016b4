"""SCAFFOLD: control variates that correct the client drift of local training (Karimireddy et al., ICML 2020).

The server keeps a control variate c per experiment, every client its own c_i (both start at zero). In a round
each sampled client i trains from the global model x with every local gradient replaced by g - c_i + c (the loop's
``correction``), ending at y_i after K_i local steps, and updates its control variate by the paper's option II,

    c_i+ = c_i - c + (x - y_i) / (K_i * lr)

(a client that took no step keeps c_i). The server moves the model and its control variate (Algorithm 1, lines
16-17):

    x <- x + server_lr * avg_i (y_i - x)          (avg over the sampled clients, weighted by --weighting)
    c <- c + (|S| / N) * mean_i (c_i+ - c_i)      (S: the sampled clients, N: all clients of the experiment)

so that c stays the mean of all N clients' c_i, as in the paper. Each sampled client receives (x, c) and sends
(y_i - x, c_i+ - c_i): twice the adapter's parameters each way (``upload_factor = 2``).

Local optimiser: the paper's algorithm and analysis are for local SGD; ``--local-optimizer sgd`` gives it
exactly (the coupled weight decay wd * w is then part of each client's objective, and option II estimates the
gradient of that objective). With Adam (the official FedCLIP default) the correction is added to the gradient
*before* Adam's moment estimates, and option II divides the model change by K_i * lr although Adam's step is not
lr times a gradient: a heuristic, not the analysed method.
"""
from __future__ import annotations

from .base import Algorithm, ServerUpdate, TrainState, register_algorithm

# Module rule of the registry: no ``import torch`` at module level (the CLI imports algorithms for --help); all
# arithmetic uses methods of the tensors we are given.

DEFAULT_SERVER_LR = 1.0  # the paper's eta_g = 1: x <- average of the clients' models, as FedAvg


@register_algorithm
class Scaffold(Algorithm):
    name = "scaffold"
    summary = "FedAvg with control variates c, c_i correcting client drift (--server-lr, default 1)"
    reference = "Karimireddy et al., SCAFFOLD: Stochastic Controlled Averaging for Federated Learning, ICML 2020"
    upload_factor = 2  # the adapter and its control variate (delta), each way
    client_state = True  # c_i
    uses = ("server_lr",)

    @property
    def server_lr(self) -> float:
        return DEFAULT_SERVER_LR if self.cfg.server_lr is None else float(self.cfg.server_lr)

    def init_state(self, server, clients) -> TrainState:
        state = super().init_state(server, clients)
        state.extra = {"c": {n: v.new_zeros(v.shape) for n, v in server.items()},  # (E, ...) server
                       "c_i": {n: v.new_zeros(v.shape) for n, v in clients.items()}}  # (L, ...) per client
        return state

    def run_round(self, state: TrainState, ctx) -> TrainState:
        c, c_i = state.extra["c"], state.extra["c_i"]
        x = ctx.broadcast(state.server)  # (S, ...): the sampled clients' starting point
        c_s, ci_s = ctx.broadcast(c), ctx.select(c_i)
        y, steps = ctx.train(x, {n: c_s[n] - ci_s[n] for n in x})

        # option II; lanes that took no step (fewer than two training samples) keep their c_i
        ci_new = {}
        for n, xn in x.items():
            shape = (-1,) + (1,) * (xn.dim() - 1)
            k = xn.new_tensor(steps).view(shape)
            updated = ci_s[n] - c_s[n] + (xn - y[n]) / (k.clamp(min=1) * self.cfg.lr)
            ci_new[n] = updated.where(k > 0, ci_s[n])

        # server: c <- c + (1/N) sum_{i in S} (c_i+ - c_i) per experiment (= |S|/N times the mean)
        exp = ctx.lane_exp[ctx.lane_exp.new_tensor(ctx.lanes)]  # experiment of each sampled lane
        n_clients = ctx.lane_exp.bincount(minlength=next(iter(c.values())).shape[0]).clamp(min=1)
        new_c = {}
        for n, cn in c.items():
            summed = cn.new_zeros(cn.shape).index_add_(0, exp, ci_new[n] - ci_s[n])
            new_c[n] = cn + summed / n_clients.to(cn.dtype).view((-1,) + (1,) * (cn.dim() - 1))

        state.server = self.server_update(state.server, ctx.average(y), {}, ctx.rnd).params
        state.extra = {"c": new_c, "c_i": ctx.scatter(c_i, ci_new)}
        return state

    def server_update(self, current, averaged, extra, rnd) -> ServerUpdate:
        """x <- x + server_lr * (avg_i y_i - x) = x + server_lr * avg_i (y_i - x) (the weights sum to one)."""
        eta = self.server_lr
        if eta == 1.0:  # the average itself, bit for bit FedAvg's
            return ServerUpdate(averaged, extra)
        return ServerUpdate({n: v + eta * (averaged[n] - v) for n, v in current.items()}, extra)
