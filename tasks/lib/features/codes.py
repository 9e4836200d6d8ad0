"""The codes of a backbone's layers from one forward pass (CodeExtractor), through timm's
and torchvision's own feature APIs, never hooks left on the model."""

from __future__ import annotations

import torch
from torch import nn

from tlflow.tasks.lib.core.errors import TlflowError
from tlflow.tasks.lib.features.backbones import POOLED, Backbone


class CodeExtractor(nn.Module):
    """The codes of `layers` from one forward pass per batch, through the libraries' own
    feature APIs and with no hook left on the backbone (the same module is fine-tuned later).

    forward(x: (N, 3, H, W)) -> {layer: (N, D) float32}: `pooled` is the classifier's input
    (the code before the classifier); any other layer is that stage's output map
    (N, C, h, w), globally average-pooled over h and w, so D = C at any input size.

    - timm: `forward_intermediates(x, indices, norm=False, output_fmt="NCHW")`, the indices
      being the layers' positions in `model.feature_info`; without `pooled` with
      `intermediates_only=True, stop_early=True` (the blocks after the last wanted stage
      don't run); with it, `forward_head(final, pre_logits=True)` on the final features
      (`forward_features` when only `pooled` is wanted).
    - torchvision: `torchvision.models.feature_extraction.create_feature_extractor`, an FX
      graph module that shares the backbone's submodules and returns the layers (a
      top-level child's name means its output) plus the node executed just before the
      classifier, i.e. its input (torchvision's classifiers end ... -> flatten / dropout /
      select the class token -> Linear); each code is computed in the graph right after
      its node, before any later in-place op can change the map.

    The codes are those of forward hooks on the same modules, bit for bit (tests/
    test_backbones.py), so the extractor id (extraction.describe_extractor) is unchanged.

    Raises TlflowError for an unknown layer (naming the valid ones), for a timm model without
    `forward_intermediates` asked for an intermediate layer, and at the first batch for a
    layer whose output is not an (N, C, h, w) map.
    """

    def __init__(self, backbone: Backbone, layers: tuple[str, ...]) -> None:
        super().__init__()
        valid = (POOLED, *backbone.layer_names)
        for layer in layers:
            if layer not in valid:
                raise TlflowError(
                    f"extract.layers: unknown layer {layer!r} of {backbone.name}; "
                    f"valid: {list(valid)}"
                )
        self.model = backbone.model
        self.layers = tuple(layers)
        self.name = backbone.name
        self.source = backbone.name.partition("/")[0]
        stages = [name for name in backbone.layer_names if name in self.layers]
        if self.source == "timm":
            if stages and not hasattr(self.model, "forward_intermediates"):
                raise TlflowError(f"extract.layers: {backbone.name} has no "
                                  "forward_intermediates; extract only pooled")
            # feature_info order = forward order, which forward_intermediates returns in
            self.indices = {backbone.layer_names.index(name): name for name in stages}
        else:
            self.graph = _torchvision_features(self.model, backbone.classifier, stages,
                                               POOLED in self.layers)

    def _timm_maps(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        """{layer: its raw output}: stage maps (N, C, h, w), `pooled` (N, D)."""
        indices = sorted(self.indices)
        if not indices:
            return {POOLED: self.model.forward_head(self.model.forward_features(x),
                                                    pre_logits=True)}
        pooled = POOLED in self.layers
        out = self.model.forward_intermediates(
            x, indices=indices, norm=False, output_fmt="NCHW",
            intermediates_only=not pooled, stop_early=not pooled,
        )
        final, maps = out if pooled else (None, out)
        codes = {self.indices[i]: m for i, m in zip(indices, maps, strict=True)}
        if pooled:
            codes[POOLED] = self.model.forward_head(final, pre_logits=True)
        return codes

    def forward(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        if self.source != "timm":
            codes = self.graph(x)
            return {name: codes[name] for name in self.layers}
        maps = self._timm_maps(x)
        return {name: _code(name, maps[name]) for name in self.layers}

    def dims(self, image_size: int) -> dict[str, int]:
        """Code size D per layer at `image_size` px, from one forward pass on a zero image."""
        with torch.inference_mode():
            codes = self(torch.zeros(1, 3, image_size, image_size))
        return {name: int(c.shape[1]) for name, c in codes.items()}


def _code(name: str, out: torch.Tensor) -> torch.Tensor:
    """(N, D) float32: `pooled` flattened, a stage's (N, C, h, w) map averaged over h, w."""
    if name == POOLED:
        return out.flatten(1).float()
    if out.ndim != 4:
        raise TlflowError(f"extract.layers: layer {name!r} gives a {tuple(out.shape)} tensor, "
                          "not an (N, C, H, W) map to average-pool; choose another layer")
    return out.float().mean(dim=(2, 3))


def _torchvision_features(model: nn.Module, classifier: nn.Module, stages: list[str],
                          pooled: bool) -> nn.Module:
    """create_feature_extractor returning `stages` and, with `pooled`, the classifier's input
    (the backbone's modules are shared, not copied), each turned into its code by `_code`
    right where it is produced: a later in-place op (resnet's ReLU after bn1, densenet's
    F.relu(features, inplace=True)) would otherwise change a map before the graph returns it.
    Returns a module: x (N, 3, H, W) -> {layer: (N, D) float32}."""
    from torchvision.models.feature_extraction import (
        create_feature_extractor,
        get_graph_node_names,
    )

    nodes = {name: name for name in stages}
    if pooled:
        head = next(n for n, m in model.named_modules() if m is classifier)
        order = get_graph_node_names(model)[1]  # eval mode, in execution order
        before = order[order.index(head) - 1]
        if before in nodes:  # the classifier's input: (N, D), no map to pool
            raise TlflowError(f"extract.layers: layer {before!r} is the classifier's input, "
                              f"not a map to average-pool; use {POOLED!r}")
        nodes[before] = POOLED
    features = create_feature_extractor(model, return_nodes=nodes)
    for graph in (features.train_graph, features.eval_graph):  # torch.fx graph rewriting
        output = next(n for n in graph.nodes if n.op == "output")
        codes = {}
        for name, node in output.args[0].items():
            with graph.inserting_after(node):
                codes[name] = graph.call_function(_code, (name, node))
        output.args = (codes,)
    features.recompile()
    return features
