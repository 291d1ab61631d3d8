"""The optimizer a run trains with: torch's AdamW, or torch's Muon on the blocks' weight matrices
and AdamW on the rest (embeddings, LM head, norms, biases), seen as one optimizer."""

import torch
from torch import nn


def build_optimizer(model: nn.Module, params: list[nn.Parameter], settings
                    ) -> torch.optim.Optimizer:
    """``settings.optimizer``'s over ``params`` (a trainer's StepSettings: its optimizer, lr,
    weight_decay, beta1, beta2 and adam_eps), weight decay on matrices only (norms and biases
    keep their scale). Muon's update is scaled to AdamW's RMS, so both take the same lr and
    decay."""
    matrices, vectors = [p for p in params if p.dim() >= 2], [p for p in params if p.dim() < 2]
    # Muon orthogonalizes a linear map's update: the embedding (a lookup) and the head stay AdamW.
    lookups = ({id(m.weight) for m in model.modules() if isinstance(m, nn.Embedding)}
               | {id(model.lm_head.weight)}) if settings.optimizer == "muon" else None
    hidden = [p for p in matrices if lookups is not None and id(p) not in lookups]
    rest = [p for p in matrices if lookups is None or id(p) in lookups]
    adamw = torch.optim.AdamW(  # fused: one kernel, faster on CPU too
        [{"params": rest, "weight_decay": settings.weight_decay},
         {"params": vectors, "weight_decay": 0.0}], lr=settings.lr,
        betas=(settings.beta1, settings.beta2), eps=settings.adam_eps, fused=True)
    adamw.register_step_pre_hook(_row_major)
    return MuonAdamW(adamw, torch.optim.Muon(
        hidden, lr=settings.lr, weight_decay=settings.weight_decay, adjust_lr_fn="match_rms_adamw")
    ) if hidden else adamw


def _row_major(optimizer: torch.optim.Optimizer, args: tuple, kwargs: dict) -> None:
    """Every parameter, gradient and state tensor row-major before a fused step, which walks
    them element by element in memory order: CPU decoding lays tall weights out column-major
    (kernels.decode_layout), and a step taken before training resumes would otherwise add one
    element's update to another."""
    for group in optimizer.param_groups:
        for p in group["params"]:
            if not p.is_contiguous():
                p.data = p.data.contiguous()
            if p.grad is not None and not p.grad.is_contiguous():
                p.grad = p.grad.contiguous()
            state = optimizer.state.get(p, {})
            for key, value in state.items():
                if torch.is_tensor(value) and not value.is_contiguous():
                    state[key] = value.contiguous()


class MuonAdamW(torch.optim.Optimizer):
    """AdamW and Muon stepped as one: their param groups and state are this optimizer's, so an lr
    schedule, a loss scaler and state_dict() see every parameter."""

    def __init__(self, adamw: torch.optim.AdamW, muon: torch.optim.Muon):
        self.parts = (adamw, muon)
        super().__init__([*adamw.param_groups, *muon.param_groups], {})
        self._share()

    def _share(self) -> None:
        n = len(self.parts[0].param_groups)
        for part, groups in zip(self.parts, (self.param_groups[:n], self.param_groups[n:])):
            part.param_groups, part.state = groups, self.state

    @torch.no_grad()
    def step(self, closure=None) -> None:
        assert closure is None, "MuonAdamW takes no closure"
        for part in self.parts:
            part.step()

    def load_state_dict(self, state_dict: dict) -> None:
        super().load_state_dict(state_dict)  # new group dicts and state: shared again
        self._share()
