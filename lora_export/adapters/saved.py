"""PEFT's `modules_to_save`: modules an adapter replaces whole (a classification head), as a swappable wrapper.

`SavedModule` wraps the base module (kept as `base_layer`, so parameter names stay the model's). Its parameters
come from, in order:
- a `BranchFeed` (branched export): inputs layout, the feed's `saved_name(M, p)` tensors replace the module's
  parameters; bank layout, each row takes the parameters of its adapter (`M.modules_to_save.p.bank`
  `[N, *shape]`) or the base ones for -1, gathered per row and applied with `torch.func.vmap`;
- the resident adapter's values (the PyTorch reference);
- the base module's own parameters.
"""

from __future__ import annotations

import torch
from torch import nn
from torch.func import functional_call, vmap

from lora_export.adapters.layer import BranchFeed, wrap_paths
from lora_export.contract import BANK_KIND, INPUTS, saved_name
from lora_export.errors import AdapterError


class SavedModule(nn.Module):
    def __init__(self, base_layer: nn.Module, path: str):
        super().__init__()
        self.base_layer = base_layer
        self.path = path
        self.params: dict[str, torch.Tensor] | None = None  # the resident adapter's values
        self.feed: BranchFeed | None = None
        self.names: list[str] = []  # parameters the feed provides (branched export)

    def set_params(self, params: dict[str, torch.Tensor] | None) -> None:
        if params is not None:
            own = dict(self.base_layer.named_parameters())
            params = {k: v.to(own[k].device, own[k].dtype) for k, v in params.items()}
        self.params = params

    def forward(self, *args, **kwargs):
        if self.feed is not None and self.names:
            if self.feed.layout == INPUTS:
                params = {p: self.feed.tensors[saved_name(self.path, p)] for p in self.names}
                return functional_call(self.base_layer, params, args, kwargs)
            return self._per_row(args, kwargs)
        if self.params is not None:
            return functional_call(self.base_layer, self.params, args, kwargs)
        return self.base_layer(*args, **kwargs)

    def _per_row(self, args, kwargs):
        """Bank layout: row i runs the module with the parameters of its adapter (or the base ones for -1)."""
        own = dict(self.base_layer.named_parameters())
        rows = {}
        for p in self.names:
            bank = self.feed.tensors[saved_name(self.path, p, BANK_KIND)]  # (N, *shape)
            every = torch.cat([own[p].unsqueeze(0).to(bank.dtype), bank], 0)  # (1 + N, *shape): base first
            rows[p] = every[self.feed.index + 1]  # (B, *shape)
        tensors = [i for i, a in enumerate(args) if isinstance(a, torch.Tensor)]

        def one_row(params, *row_args):
            full = list(args)
            for i, a in zip(tensors, row_args):
                full[i] = a
            return functional_call(self.base_layer, params, tuple(full), kwargs)

        # each row keeps a batch dim of 1, so modules that index dim 0 or 1 (`x[:, 0]`) work unchanged
        out = vmap(one_row)(rows, *[args[i].unsqueeze(1) for i in tensors])
        return out.squeeze(1)


# -- checks and in-place edits on a model (paths as PEFT names them) ---------------------------------------------


def _params(module: nn.Module) -> dict[str, nn.Parameter]:
    return {k.replace("base_layer.", ""): v for k, v in module.named_parameters()}


def check_saved_fits(modules: dict[str, nn.Module], adapter) -> None:
    """Each `modules_to_save` module exists with parameters of the same shapes (a head with another number of
    labels is refused), and each saved base layer has the model's shape (a resized vocabulary is refused)."""
    for path, params in sorted(adapter.saved.items()):
        module = modules.get(path)
        if module is None:
            raise AdapterError(
                f"adapter {adapter.name}: modules_to_save names {path}, which the model lacks; "
                "is it an adapter for this base model (the same task head class)?"
            )
        own = _params(module)
        for name, value in sorted(params.items()):
            if name not in own:
                raise AdapterError(
                    f"adapter {adapter.name}: modules_to_save {path}.{name} is not a parameter of the model's "
                    f"{type(module).__name__} (it has {', '.join(sorted(own)) or 'none'})"
                )
            _check_shape(adapter.name, f"modules_to_save {path}.{name}", value, own[name])
    for path, params in sorted(adapter.base_layers.items()):
        own = _params(modules[path]) if path in modules else {}
        for name, value in sorted(params.items()):
            if name in own and tuple(value.shape) != tuple(own[name].shape):
                raise AdapterError(
                    f"adapter {adapter.name}: {path}.base_layer.{name} (saved with save_embedding_layers) is "
                    f"{list(value.shape)} but the model's is {list(own[name].shape)}: the adapter was trained on a "
                    f"resized vocabulary; resize the base model's embeddings to {value.shape[0]} "
                    "(resize_token_embeddings), save it, and export that"
                )


def _check_shape(adapter: str, what: str, value: torch.Tensor, own: torch.Tensor) -> None:
    if tuple(value.shape) == tuple(own.shape):
        return
    if value.dim() == own.dim() and tuple(value.shape[1:]) == tuple(own.shape[1:]):
        raise AdapterError(
            f"adapter {adapter}: {what} has {value.shape[0]} outputs but the model's has {own.shape[0]} (a head "
            f"with another number of labels): load the base model with num_labels={value.shape[0]} and export that"
        )
    raise AdapterError(
        f"adapter {adapter}: {what} is {list(value.shape)} but the model's is {list(own.shape)}; "
        "is it an adapter for this base model?"
    )


def base_layers_changed(modules: dict[str, nn.Module], adapter) -> list[str]:
    """Saved base layers (`save_embedding_layers`) whose values differ from the model's."""
    changed = []
    for path, params in sorted(adapter.base_layers.items()):
        own = _params(modules[path])
        changed += [f"{path}.{n}" for n, v in sorted(params.items()) if not torch.equal(v.to(own[n].dtype), own[n])]
    return changed


def apply_base_layers(modules: dict[str, nn.Module], adapter) -> None:
    """Copy saved base layers into the model's `modules` (by path) in place, as PEFT's loader does (a tied output
    layer follows)."""
    for path, params in sorted(adapter.base_layers.items()):
        own = _params(modules[path])
        with torch.no_grad():
            for name, value in params.items():
                own[name].copy_(value.to(own[name].dtype))


def wrap_saved(model: nn.Module, paths) -> dict[str, SavedModule]:
    """Wrap each `modules_to_save` path with a `SavedModule` (idempotent)."""
    return wrap_paths(model, paths, SavedModule)


def saved_modules(model: nn.Module) -> dict[str, SavedModule]:
    return {m.path: m for m in model.modules() if isinstance(m, SavedModule)}


def copy_saved(model: nn.Module, adapter) -> None:
    """Merged export: the saved modules' parameters become the model's (new parameters: ties are broken, as
    PEFT's modules_to_save copies the module)."""
    for path, params in sorted(adapter.saved.items()):
        module = model.get_submodule(path)
        for name, value in params.items():
            owner_path, _, attr = name.rpartition(".")
            owner = module.get_submodule(owner_path) if owner_path else module
            old = getattr(owner, attr)
            setattr(owner, attr, nn.Parameter(value.to(old.device, old.dtype).clone(), requires_grad=False))
