"""Real (paper-scale) teachers through diffusers: a pixel or latent UNet with its DDPM scheduler
config, or a flow-matching transformer (``SanaTransformer2DModel``, ``WanTransformer3DModel``) with
its ``FlowMatchEulerDiscreteScheduler`` config, wrapped as a :class:`~common.teachers.denoiser.Denoiser`.

Weights load from a local directory or from a hub cache the user already has
(``local_files_only=True``): nothing is ever downloaded. The teacher is named
``diffusers:<directory or hub id>`` wherever a teacher is named (``load_teacher``).

Conditions: a text-conditioned UNet (``UNet2DConditionModel``) and the transformers take ``cond`` as
precomputed text embeddings (B, L, D), with the empty-prompt (or negative-prompt) embedding as the null
condition; a class-conditional ``UNet2DModel`` takes labels; an unconditional one ignores ``cond``.
Flow-matching transformers predict the velocity ``u = eps - x0`` at ``1000 s`` (diffusers' timestep).

Models with conditions beyond the token sequence take them packed into one extra last token, so that
``cond`` stays one tensor (B, L + 1, D) that guidance, label dropout and per-sample indexing handle as
any other (:func:`pack_condition`): SDXL's UNet (``addition_embed_type: text_time``) reads the pooled
text embedding and the six ``time_ids`` (original size, crop, target size) from it, SD3's transformer
(``SD3Transformer2DModel``) its ``pooled_projections``. Prompt files for them hold packed embeddings
(the null one too: the empty prompt's, with its pooled embedding and time ids).
"""
from __future__ import annotations

import hashlib
import json
from pathlib import Path

import torch
from torch import Tensor, nn

from common import noise
from common.teachers.denoiser import Denoiser

PREFIX = "diffusers:"
PREDICTIONS = {"epsilon": "eps", "v_prediction": "v", "sample": "x0"}
UNETS = ("UNet2DConditionModel", "UNet2DModel")
TRANSFORMERS = ("SanaTransformer2DModel", "WanTransformer3DModel", "SD3Transformer2DModel")  # flow, text


def pack_condition(text: Tensor, pooled: Tensor, time_ids: Tensor | None = None) -> Tensor:
    """``(B, L + 1, D)``: the text tokens ``(B, L, D)`` and a last token holding the pooled embedding
    ``(B, P)`` then the time ids ``(B, 6)`` (SDXL), zero-padded to ``D``."""
    extra = pooled if time_ids is None else torch.cat([pooled, time_ids.to(pooled)], 1)
    if extra.shape[1] > text.shape[2]:
        raise ValueError(f"the pooled embedding and time ids ({extra.shape[1]} values) do not fit in one token of "
                         f"width {text.shape[2]}")
    last = torch.nn.functional.pad(extra.to(text), (0, text.shape[2] - extra.shape[1]))
    return torch.cat([text, last[:, None]], 1)


def unpack_condition(cond: Tensor, pooled_dim: int, time_ids: bool) -> tuple[Tensor, Tensor, Tensor | None]:
    """The inverse of :func:`pack_condition`: ``(text, pooled, time_ids or None)``."""
    last = cond[:, -1]
    return cond[:, :-1], last[:, :pooled_dim], last[:, pooled_dim:pooled_dim + 6] if time_ids else None


class DiffusersNet(nn.Module):
    """``net(x, t, cond, return_features=[...])`` over a diffusers UNet; features are the outputs of
    named submodules (for example ``mid_block``), captured by forward hooks, as maps (B, C, h, w)."""

    def __init__(self, model: nn.Module):
        super().__init__()
        self.model = model
        cfg = model.config
        self.kind = type(model).__name__
        self.in_channels = cfg.in_channels
        size = getattr(cfg, "sample_size", None)  # Wan's video latents have none: the method sets the shape
        self.image_size = size if isinstance(size, int) or size is None else size[0]
        self.text_conditioned = self.kind in TRANSFORMERS or getattr(cfg, "cross_attention_dim", None) is not None
        self.class_conditioned = bool(getattr(cfg, "num_class_embeds", None)) or \
            getattr(cfg, "class_embed_type", None) is not None
        # conditions packed into a last token (pack_condition): SDXL's text_time, SD3's pooled projection
        self.time_ids = getattr(cfg, "addition_embed_type", None) == "text_time"
        if self.time_ids:
            self.pooled_dim = cfg.projection_class_embeddings_input_dim - 6 * cfg.addition_time_embed_dim
        else:
            self.pooled_dim = getattr(cfg, "pooled_projection_dim", None) if self.kind == "SD3Transformer2DModel" \
                else None

    def _image_stream(self, out):
        """A block's image features: a UNet down block's ``(hidden, residuals)`` first; an SD3 joint
        block's ``(text, image)`` second."""
        if not isinstance(out, tuple):
            return out
        return out[-1] if self.kind == "SD3Transformer2DModel" else out[0]

    def feature_dims(self, names: list[str]) -> dict[str, int]:
        """The channel (token) width of each named block's output: a transformer's ``heads * head_dim``;
        a UNet's ``mid_block``, ``down_blocks.<i>``, ``up_blocks.<i>`` from its ``block_out_channels``."""
        cfg = self.model.config
        out = {}
        for name in names:
            if self.kind in TRANSFORMERS:
                out[name] = cfg.num_attention_heads * cfg.attention_head_dim
                continue
            chans = list(cfg.block_out_channels)
            parts = name.split(".")
            if name == "mid_block":
                out[name] = chans[-1]
            elif len(parts) == 2 and parts[0] in ("down_blocks", "up_blocks") and parts[1].isdigit() \
                    and int(parts[1]) < len(chans):
                out[name] = (chans if parts[0] == "down_blocks" else chans[::-1])[int(parts[1])]
            else:
                raise ValueError(f"cannot tell the feature width of block {name!r} of {self.kind} (use mid_block, "
                                 f"down_blocks.<i> or up_blocks.<i>, i < {len(chans)})")
        return out

    def forward(self, x: Tensor, t: Tensor, cond=None, return_features: list[str] | None = None,
                guidance: Tensor | None = None):
        """``guidance`` (B,): the guidance input of a transformer built with ``guidance_embeds``
        (SANA-Sprint's student), passed as given."""
        feats, hooks = {}, []
        extra = {} if guidance is None else {"guidance": guidance}
        for name in return_features or ():
            module = dict(self.model.named_modules()).get(name)
            if module is None:
                raise KeyError(f"no submodule {name!r} in {type(self.model).__name__} to return features from")
            hooks.append(module.register_forward_hook(
                lambda _m, _i, out, name=name: feats.__setitem__(name, self._image_stream(out))))
        try:
            if self.pooled_dim is not None:
                text, pooled, time_ids = unpack_condition(cond, self.pooled_dim, self.time_ids)
                if self.time_ids:
                    out = self.model(x, t, encoder_hidden_states=text, return_dict=False,
                                     added_cond_kwargs={"text_embeds": pooled, "time_ids": time_ids})[0]
                else:
                    out = self.model(x, encoder_hidden_states=text, pooled_projections=pooled, timestep=t,
                                     return_dict=False)[0]
            elif self.kind in TRANSFORMERS:
                out = self.model(x, encoder_hidden_states=cond, timestep=t, return_dict=False, **extra)[0]
            elif self.text_conditioned:
                out = self.model(x, t, encoder_hidden_states=cond, return_dict=False)[0]
            elif self.class_conditioned:
                out = self.model(x, t, class_labels=cond, return_dict=False)[0]
            else:
                out = self.model(x, t, return_dict=False)[0]
        finally:
            for h in hooks:
                h.remove()
        return (out, feats) if return_features else out


class HubDenoiser(Denoiser):
    """A Denoiser whose null condition may be a stored empty-prompt embedding."""

    def __init__(self, net, convention, prediction, null_embedding: Tensor | None = None, time_scale: float = 1.0):
        super().__init__(net, convention, prediction, time_scale)
        self.register_buffer("null_embedding", null_embedding, persistent=False)

    def null_cond(self, cond):
        if self.null_embedding is not None and isinstance(cond, Tensor) and cond.is_floating_point():
            return self.null_embedding.to(cond).expand_as(cond)
        return super().null_cond(cond)

    def with_net(self, net: nn.Module, time_scale: float | None = None) -> "HubDenoiser":
        return HubDenoiser(net, self.convention, self.prediction, self.null_embedding,
                           self.time_scale if time_scale is None else time_scale)


def _resolve(spec: str) -> Path:
    """A local directory, or a hub id already in the local cache."""
    path = Path(spec).expanduser()
    if path.is_dir():
        return path
    try:
        from huggingface_hub import snapshot_download

        return Path(snapshot_download(spec, local_files_only=True))
    except Exception as e:  # noqa: BLE001 - every failure here means "not on this machine"
        raise FileNotFoundError(f"diffusers teacher not found locally: {spec!r} is neither a directory nor a hub id "
                                f"in the local cache (nothing is downloaded; fetch it yourself first)") from e


def load_null_embedding(path: str) -> Tensor:
    """The empty prompt's embedding from a prompt-embedding file (``common.data.labels``)."""
    from common.data.labels import load_prompt_file

    return load_prompt_file(path)["null"].float()


def convention_from_scheduler(path: Path, subfolder: str = "scheduler") -> tuple[noise.Convention, str, float]:
    """(convention, prediction kind, time scale) from a diffusers scheduler config."""
    cfg_path = path / subfolder / "scheduler_config.json"
    if not cfg_path.is_file():
        raise FileNotFoundError(f"no scheduler config at {cfg_path}")
    cfg = json.loads(cfg_path.read_text())
    # flow matching: the FlowMatch schedulers, or a multistep solver run on flow sigmas (Wan, SANA)
    if cfg.get("_class_name", "").startswith("FlowMatch") or cfg.get("prediction_type") == "flow_prediction" \
            or cfg.get("use_flow_sigmas"):
        return noise.RectifiedFlow(), "flow", float(cfg.get("num_train_timesteps", 1000))
    schedule = cfg.get("beta_schedule", "linear")
    if schedule not in ("linear", "scaled_linear"):
        raise ValueError(f"{cfg_path}: beta_schedule {schedule!r} is not supported (linear, scaled_linear)")
    kind = cfg.get("prediction_type", "epsilon")
    if kind not in PREDICTIONS:
        raise ValueError(f"{cfg_path}: prediction_type {kind!r} is not supported ({', '.join(PREDICTIONS)})")
    conv = noise.DiscreteVP(cfg.get("num_train_timesteps", 1000), cfg.get("beta_start", 0.0001),
                            cfg.get("beta_end", 0.02), schedule)
    return conv, PREDICTIONS[kind], 1.0


def weights_sha256(path: Path) -> str:
    """One hash over the weight files and configs of a model directory (names and contents, sorted)."""
    h = hashlib.sha256()
    for f in sorted(p for p in path.rglob("*") if p.is_file() and p.suffix in (".safetensors", ".bin", ".json")):
        h.update(str(f.relative_to(path)).encode())
        with open(f, "rb") as fh:
            for block in iter(lambda: fh.read(1 << 24), b""):
                h.update(block)
    return h.hexdigest()


def load_diffusers_teacher(spec: str, subfolder: str | None = None, frozen: bool = True,
                           null_embedding: Tensor | None = None) -> HubDenoiser:
    """``spec`` is a directory holding ``<subfolder>/`` (the network: ``unet/`` or ``transformer/`` when
    not given) and ``scheduler/``, or such a hub id."""
    import diffusers

    path = _resolve(spec.removeprefix(PREFIX))
    if subfolder is None:
        subfolder = "transformer" if (path / "transformer").is_dir() and not (path / "unet").is_dir() else "unet"
    sub = path / subfolder if subfolder else path
    cfg_file = sub / "config.json"
    if not cfg_file.is_file():
        raise FileNotFoundError(f"no model config at {cfg_file}")
    cls_name = json.loads(cfg_file.read_text()).get("_class_name", "UNet2DConditionModel")
    if cls_name not in UNETS + TRANSFORMERS:
        raise ValueError(f"{cfg_file}: {cls_name} teachers are not wired yet ({', '.join(UNETS + TRANSFORMERS)})")
    model = getattr(diffusers, cls_name).from_pretrained(path, subfolder=subfolder, local_files_only=True)
    conv, kind, time_scale = convention_from_scheduler(path)
    den = HubDenoiser(DiffusersNet(model.float()), conv, kind, null_embedding, time_scale).eval()
    if frozen:
        den.requires_grad_(False)
    den.source = {"path": str(path), "sha256": weights_sha256(sub)}
    den.meta = {"class": cls_name}
    return den
