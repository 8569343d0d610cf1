"""The paper-scale code path without weights: tiny random-weight diffusers UNets saved like real
checkpoints (a model directory with ``unet/`` and ``scheduler/``), loaded through
``diffusers:<dir>`` and trained for a few steps from the projects' paper-scale configs."""
import json

import numpy as np
import pytest
import torch

from test_launchers import run

diffusers = pytest.importorskip("diffusers")

from common import noise  # noqa: E402
from common.teachers.embedded import load_teacher  # noqa: E402


def _scheduler(root, schedule, beta_end):
    (root / "scheduler").mkdir(parents=True)
    (root / "scheduler" / "scheduler_config.json").write_text(json.dumps({
        "_class_name": "DDPMScheduler", "num_train_timesteps": 1000, "beta_start": 0.00085 if schedule ==
        "scaled_linear" else 0.0001, "beta_end": beta_end, "beta_schedule": schedule, "prediction_type": "epsilon"}))


@pytest.fixture(scope="module")
def sd_like(tmp_path_factory):
    """A Stable-Diffusion-shaped text-conditioned latent UNet, and a prompt-embedding file."""
    root = tmp_path_factory.mktemp("sd")
    torch.manual_seed(0)
    unet = diffusers.UNet2DConditionModel(
        sample_size=8, in_channels=4, out_channels=4, layers_per_block=1, block_out_channels=(8, 16),
        down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"), up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
        cross_attention_dim=16, attention_head_dim=4, norm_num_groups=4)
    unet.save_pretrained(root / "model" / "unet")
    _scheduler(root / "model", "scaled_linear", 0.012)
    rng = np.random.default_rng(0)
    np.savez(root / "prompts.npz", embeddings=rng.standard_normal((10, 5, 16)).astype(np.float16),
             null=rng.standard_normal((5, 16)).astype(np.float32))
    return root


@pytest.fixture(scope="module")
def cifar_like(tmp_path_factory):
    """A DDPM-CIFAR-shaped pixel UNet (unconditional, linear betas) and a few RGB image shards."""
    from common.data.shards import encode_png, write_shards

    root = tmp_path_factory.mktemp("cifar")
    torch.manual_seed(0)
    unet = diffusers.UNet2DModel(sample_size=8, in_channels=3, out_channels=3, layers_per_block=1,
                                 block_out_channels=(8, 16), down_block_types=("DownBlock2D", "AttnDownBlock2D"),
                                 up_block_types=("AttnUpBlock2D", "UpBlock2D"), norm_num_groups=4)
    unet.save_pretrained(root / "model" / "unet")
    _scheduler(root / "model", "linear", 0.02)
    rng = np.random.default_rng(0)
    write_shards(root / "shards", "train", ({"__key__": f"{i:05d}", "png": encode_png(
        rng.integers(0, 256, (8, 8, 3), dtype=np.uint8)), "cls": str(i % 10)} for i in range(40)))
    return root


@pytest.fixture(scope="module")
def wan_like(tmp_path_factory):
    """A Wan-shaped text-to-video flow transformer (its diffusers scheduler on flow sigmas), a prompt
    file with a negative-prompt embedding as ``null``, and a few shards of video latents with their
    prompt embeddings."""
    from common.data.shards import write_shards

    root = tmp_path_factory.mktemp("wan")
    torch.manual_seed(0)
    model = diffusers.WanTransformer3DModel(patch_size=(1, 2, 2), num_attention_heads=2, attention_head_dim=8,
                                            in_channels=4, out_channels=4, text_dim=16, freq_dim=16, ffn_dim=32,
                                            num_layers=2, rope_max_seq_len=32)
    model.save_pretrained(root / "model" / "transformer")
    (root / "model" / "scheduler").mkdir(parents=True)
    (root / "model" / "scheduler" / "scheduler_config.json").write_text(json.dumps({
        "_class_name": "UniPCMultistepScheduler", "num_train_timesteps": 1000, "prediction_type": "flow_prediction",
        "use_flow_sigmas": True, "flow_shift": 3.0}))
    rng = np.random.default_rng(0)
    np.savez(root / "prompts.npz", embeddings=rng.standard_normal((4, 5, 16)).astype(np.float16),
             null=rng.standard_normal((5, 16)).astype(np.float32))

    write_shards(root / "latents", "train", ({"__key__": f"{i:05d}",
                                              "latent.npy": _npy(rng.standard_normal((4, 3, 8, 8)).astype(np.float16)),
                                              "text.npy": _npy(rng.standard_normal((5, 16)).astype(np.float16))}
                                             for i in range(8)))
    return root


def _npy(a):
    import io

    buf = io.BytesIO()
    np.save(buf, a)
    return buf.getvalue()


@pytest.fixture(scope="module")
def sana_like(tmp_path_factory):
    """A SANA-shaped text-to-image flow transformer with QK-norm (the Sprint teacher's), its flow
    scheduler, a prompt file with the empty caption's embedding, and a few shards of latents."""
    from common.data.shards import write_shards

    root = tmp_path_factory.mktemp("sana")
    torch.manual_seed(0)
    model = diffusers.SanaTransformer2DModel(
        patch_size=1, in_channels=4, out_channels=4, num_layers=3, num_attention_heads=2, attention_head_dim=8,
        num_cross_attention_heads=2, cross_attention_head_dim=8, cross_attention_dim=16, caption_channels=16,
        sample_size=8, qk_norm="rms_norm_across_heads")
    model.save_pretrained(root / "model" / "transformer")
    (root / "model" / "scheduler").mkdir(parents=True)
    (root / "model" / "scheduler" / "scheduler_config.json").write_text(json.dumps({
        "_class_name": "FlowMatchEulerDiscreteScheduler", "num_train_timesteps": 1000, "shift": 3.0}))
    rng = np.random.default_rng(0)
    np.savez(root / "prompts.npz", embeddings=rng.standard_normal((4, 5, 16)).astype(np.float16),
             null=rng.standard_normal((5, 16)).astype(np.float32))
    write_shards(root / "latents", "train", ({"__key__": f"{i:05d}",
                                              "latent.npy": _npy(rng.standard_normal((4, 8, 8)).astype(np.float16)),
                                              "text.npy": _npy(rng.standard_normal((5, 16)).astype(np.float16))}
                                             for i in range(8)))
    return root


def test_sana_sprints_student_is_the_teacher_with_a_zeroed_guidance_embedder(sana_like):
    from common.config import ConfigError
    from projects.sana_sprint.method import SanaSprint

    kw = dict(teacher=f"diffusers:{sana_like / 'model'}", null_embedding=str(sana_like / "prompts.npz"),
              disc_blocks=["transformer_blocks.0", "transformer_blocks.2"], require_qk_norm=True)
    m = SanaSprint(**kw)
    assert m.roles["student"].net.net.model.config.guidance_embeds and m.sample_shape == (4, 8, 8)
    x, c, t = torch.randn(2, 4, 8, 8), torch.randn(2, 5, 16), torch.tensor([0.4, 1.2])
    with torch.no_grad():
        torch.testing.assert_close(m.den.student(x, t, {"c": c, "w": torch.tensor([4.0, 5.0])}), m.den.teacher(x, t, c))
    assert sum(v.numel() for v in m.roles["discriminator"].net.parameters()) > 0
    plain = sana_like / "plain"
    if not plain.exists():
        cfg = json.loads((sana_like / "model" / "transformer" / "config.json").read_text())
        model = diffusers.SanaTransformer2DModel.from_config({**cfg, "qk_norm": None})
        model.save_pretrained(plain / "transformer")
        (plain / "scheduler").mkdir()
        (plain / "scheduler" / "scheduler_config.json").write_text(
            (sana_like / "model" / "scheduler" / "scheduler_config.json").read_text())
    with pytest.raises(ConfigError, match="has no QK-norm"):
        SanaSprint(**{**kw, "teacher": f"diffusers:{plain}"})


def test_a_flow_matching_video_transformer_loads_as_a_flow_teacher(wan_like):
    den = load_teacher(f"diffusers:{wan_like / 'model'}")
    assert isinstance(den.convention, noise.RectifiedFlow) and den.prediction == "flow" and den.time_scale == 1000
    x, c = torch.randn(2, 4, 3, 8, 8), torch.randn(2, 5, 16)
    s = torch.tensor([0.2, 0.9])
    with torch.no_grad():
        direct = den.net.model(x, timestep=1000 * s, encoder_hidden_states=c, return_dict=False)[0]
        torch.testing.assert_close(den(x, s, c), direct)


def test_diffusers_teacher_convention_and_features(sd_like, cifar_like):
    den = load_teacher(f"diffusers:{sd_like / 'model'}")
    assert isinstance(den.convention, noise.DiscreteVP) and den.prediction == "eps"
    abar = torch.cumprod(1 - torch.linspace(0.00085**0.5, 0.012**0.5, 1000, dtype=torch.float64) ** 2, 0)
    torch.testing.assert_close(den.convention.alphas_cumprod, abar)  # read from the scheduler, not assumed
    assert len(den.source["sha256"]) == 64 and not any(p.requires_grad for p in den.parameters())
    pix = load_teacher(f"diffusers:{cifar_like / 'model'}")
    x = torch.randn(2, 3, 8, 8)
    out, feats = pix(x, torch.tensor([10.0, 500.0]), None, return_features=["mid_block"])
    assert out.shape == x.shape and feats["mid_block"].shape == (2, 16, 4, 4)
    torch.testing.assert_close(out, pix(x, torch.tensor([10.0, 500.0]), None))  # hooks removed, same output
    with pytest.raises(FileNotFoundError, match="not found locally"):
        load_teacher("diffusers:nobody/no-such-model")


def test_swiftbrush_vp_student_is_the_eps_form_at_the_last_timestep(sd_like):
    from projects.swiftbrush.method import SwiftBrush

    m = SwiftBrush(teacher=f"diffusers:{sd_like / 'model'}", null_embedding=str(sd_like / "prompts.npz"),
                   roles={"critic": {"init": "lora", "lora": {"targets": ["to_q", "to_v"], "rank": 4, "alpha": 8.0}}})
    z, c = torch.randn(2, 4, 8, 8), torch.randn(2, 5, 16)
    abar = m.den.teacher.convention.alphas_cumprod[-1].float()
    with torch.no_grad():
        eps = m.roles["student"].net(z, torch.full((2,), 999.0), c)
        torch.testing.assert_close(m.generate(z, c), (z - (1 - abar).sqrt() * eps) / abar.sqrt(), rtol=1e-4, atol=1e-4)
    # the fake-score optimizer holds the LoRA parameters only (spec pitfall 9)
    lora = {id(p) for n, p in m.roles["critic"].net.named_parameters() if "lora_" in n}
    assert lora and {id(p) for p in m.roles["critic"].trainable_params()} == lora
    # label dropout on embeddings swaps in the empty prompt
    null = m.den.teacher.drop_cond(c, torch.tensor([True, False]))
    torch.testing.assert_close(null[0], m.den.teacher.null_embedding)
    torch.testing.assert_close(null[1], c[1])


def _latent_shards(root, shape, cond_shape, n=8):
    from common.data.shards import write_shards

    rng = np.random.default_rng(0)
    write_shards(root / "latents", "train", ({"__key__": f"{i:05d}",
                                              "latent.npy": _npy(rng.standard_normal(shape).astype(np.float16)),
                                              "text.npy": _npy(rng.standard_normal(cond_shape).astype(np.float16))}
                                             for i in range(n)))
    np.savez(root / "prompts.npz", embeddings=rng.standard_normal((4, *cond_shape)).astype(np.float16),
             null=rng.standard_normal(cond_shape).astype(np.float32))


@pytest.fixture(scope="module")
def sdxl_like(tmp_path_factory):
    """An SDXL-shaped UNet (text_time added conditions: a pooled embedding of 8 and six time ids) with
    its scaled-linear DDPM scheduler, and latent shards whose conditions are packed (5 tokens + 1)."""
    root = tmp_path_factory.mktemp("sdxl")
    torch.manual_seed(0)
    unet = diffusers.UNet2DConditionModel(
        sample_size=8, in_channels=4, out_channels=4, layers_per_block=1, block_out_channels=(8, 16),
        down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"), up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
        cross_attention_dim=16, attention_head_dim=4, norm_num_groups=4, addition_embed_type="text_time",
        addition_time_embed_dim=4, projection_class_embeddings_input_dim=8 + 6 * 4)
    unet.save_pretrained(root / "model" / "unet")
    _scheduler(root / "model", "scaled_linear", 0.012)
    _latent_shards(root, (4, 8, 8), (6, 16))
    return root


@pytest.fixture(scope="module")
def sd3_like(tmp_path_factory):
    """An SD3-shaped joint flow transformer (pooled projection of 8) with its flow scheduler (shift 3),
    and latent shards whose conditions are packed (5 tokens + 1)."""
    root = tmp_path_factory.mktemp("sd3")
    torch.manual_seed(0)
    model = diffusers.SD3Transformer2DModel(
        sample_size=8, patch_size=2, in_channels=4, num_layers=2, attention_head_dim=8, num_attention_heads=2,
        joint_attention_dim=16, caption_projection_dim=16, pooled_projection_dim=8, out_channels=4,
        pos_embed_max_size=8)
    model.save_pretrained(root / "model" / "transformer")
    (root / "model" / "scheduler").mkdir(parents=True)
    (root / "model" / "scheduler" / "scheduler_config.json").write_text(json.dumps({
        "_class_name": "FlowMatchEulerDiscreteScheduler", "num_train_timesteps": 1000, "shift": 3.0}))
    _latent_shards(root, (4, 8, 8), (6, 16))
    return root


def test_packed_conditions_reach_sdxl_and_sd3_as_their_own_arguments(sdxl_like, sd3_like):
    from common.teachers.hub import pack_condition, unpack_condition

    g = torch.Generator().manual_seed(0)
    text, pooled, ids = torch.randn(2, 5, 16, generator=g), torch.randn(2, 8, generator=g), \
        torch.tensor([[64.0, 64, 0, 0, 64, 64], [32, 32, 0, 0, 64, 64]])
    packed = pack_condition(text, pooled, ids)
    assert packed.shape == (2, 6, 16)
    for a, b in zip(unpack_condition(packed, 8, True), (text, pooled, ids)):
        torch.testing.assert_close(a, b)
    with pytest.raises(ValueError, match="do not fit in one token of width 4"):
        pack_condition(text[..., :4], pooled, ids)
    x, t = torch.randn(2, 4, 8, 8, generator=g), torch.tensor([10.0, 500.0])
    den = load_teacher(f"diffusers:{sdxl_like / 'model'}")
    assert isinstance(den.convention, noise.DiscreteVP)
    want = den.net.model(x, t, encoder_hidden_states=text, added_cond_kwargs={"text_embeds": pooled, "time_ids": ids},
                         return_dict=False)[0]
    torch.testing.assert_close(den(x, t, packed), want)
    other = pack_condition(text, pooled, ids.flip(0))  # the time ids matter
    assert not torch.allclose(den(x, t, other), want)
    assert den.net.feature_dims(["mid_block", "down_blocks.0", "up_blocks.0"]) == \
        {"mid_block": 16, "down_blocks.0": 8, "up_blocks.0": 16}
    den = load_teacher(f"diffusers:{sd3_like / 'model'}")
    assert isinstance(den.convention, noise.RectifiedFlow) and den.prediction == "flow"
    packed = pack_condition(text, pooled)
    s = torch.tensor([0.3, 0.9])
    want = den.net.model(x, encoder_hidden_states=text, pooled_projections=pooled, timestep=1000 * s,
                         return_dict=False)[0]
    torch.testing.assert_close(den(x, s, packed), want)
    _, feats = den(x, s, packed, return_features=["transformer_blocks.0"])
    assert feats["transformer_blocks.0"].shape == (2, 16, 16)  # the image tokens, not the text stream


DMD_STEPS = ["schedule=[{name: main, cycle: [[student, critic, discriminator]]}]", "data.batch_size=2",
             "trainer.devices=1", "trainer.strategy=auto", "trainer.precision=32-true"]


@pytest.mark.parametrize("project,overrides", [
    # DMD2 and Flash-DMD on SDXL's packed conditions, Flash-DMD's flow variant on SD3's: every turn
    ("dmd2", lambda r: ["projects/dmd2/configs/sdxl_4step.yaml", f"module.teacher=diffusers:{r / 'model'}",
                        f"module.null_embedding={r / 'prompts.npz'}", f"data.shards={r / 'latents'}", *DMD_STEPS]),
    ("flash_dmd", lambda r: ["projects/flash_dmd/configs/sdxl_4step.yaml", f"module.teacher=diffusers:{r / 'model'}",
                             f"module.null_embedding={r / 'prompts.npz'}", f"data.shards={r / 'latents'}",
                             *DMD_STEPS]),
    ("flash_dmd_sd3", lambda r: ["projects/flash_dmd/configs/sd3_medium_4step.yaml",
                                 f"module.teacher=diffusers:{r / 'model'}", f"module.null_embedding={r / 'prompts.npz'}",
                                 f"data.shards={r / 'latents'}", "module.disc_blocks=[transformer_blocks.0]",
                                 *DMD_STEPS]),
])
def test_dmd_paper_scale_configs_train_two_steps(project, overrides, sdxl_like, sd3_like, tmp_path):
    import csv

    root = sd3_like if project.endswith("sd3") else sdxl_like
    out = tmp_path / "run"
    run("launchers/fit.py", *overrides(root), "run.iterations=2", "trainer.log_every_n_steps=1", f"run.dir={out}",
        check=True)
    rows = list(csv.DictReader(open(out / "metrics.csv")))
    losses = {k: [float(r[k]) for r in rows if r.get(k)] for k in ("student/loss", "critic/loss", "discriminator/loss")}
    assert all(len(v) == 2 and all(np.isfinite(v)) for v in losses.values()), losses
    ckpt = torch.load(out / "checkpoints" / "last.ckpt", weights_only=True)
    assert ckpt["distill"]["iteration"] == 2
    assert not any(k.startswith("nets.teacher.") for k in ckpt["state_dict"])


@pytest.mark.parametrize("project,overrides", [
    ("swiftbrush", lambda r: ["projects/swiftbrush/configs/sd21_base.yaml",
                              f"module.teacher=diffusers:{r / 'model'}", f"module.null_embedding={r / 'prompts.npz'}",
                              f"data.embeddings={r / 'prompts.npz'}", "roles.critic.lora.rank=4", "data.batch_size=2",
                              "trainer.precision=32-true"]),
    ("uni_instruct", lambda r: ["projects/uni_instruct/configs/cifar10_ddpm.yaml",
                                f"module.teacher=diffusers:{r / 'model'}", f"data.shards={r / 'shards'}",
                                "data.batch_size=4", "schedule.0.until=1", "schedule.1.until=2",
                                "trainer.precision=32-true"]),
    # rCM: the tangent warm-up's student step (JVP through the video transformer), then critic and
    # student with the DMD term
    ("rcm", lambda r: ["projects/rcm/configs/wan2.1_t2v_1.3b.yaml", f"module.teacher=diffusers:{r / 'model'}",
                       f"module.null_embedding={r / 'prompts.npz'}", f"data.shards={r / 'latents'}",
                       "module.sample_shape=[4,3,8,8]", "module.jvp_impl=torch", "data.batch_size=2",
                       "schedule.0.until=1", "module.tangent_warmup=1", "schedule.1.cycle=[[critic],[student]]",
                       "trainer.devices=1", "trainer.strategy=auto", "trainer.precision=32-true"]),
    # SANA-Sprint: G (sCM with the JVP through the QK-norm transformer, and LADD), D, G
    ("sana_sprint", lambda r: ["projects/sana_sprint/configs/sana_1.6b_1024px.yaml",
                               f"module.teacher=diffusers:{r / 'model'}", f"module.null_embedding={r / 'prompts.npz'}",
                               f"data.shards={r / 'latents'}", "module.sample_shape=[4,8,8]", "module.jvp_impl=torch",
                               "module.disc_blocks=[transformer_blocks.0,transformer_blocks.2]", "data.batch_size=2",
                               "trainer.devices=1", "trainer.strategy=auto", "trainer.precision=32-true"]),
])
def test_paper_scale_config_trains_a_few_steps(project, overrides, sd_like, cifar_like, wan_like, sana_like, tmp_path):
    root = {"swiftbrush": sd_like, "uni_instruct": cifar_like, "rcm": wan_like, "sana_sprint": sana_like}[project]
    out = tmp_path / "run"
    run("launchers/fit.py", *overrides(root), "run.iterations=3", "trainer.log_every_n_steps=1",
        f"run.dir={out}", check=True)
    import csv

    rows = list(csv.DictReader(open(out / "metrics.csv")))
    losses = [float(r[k]) for r in rows for k in ("student/loss", "critic/loss", "discriminator/loss") if r.get(k)]
    ckpt = torch.load(out / "checkpoints" / "last.ckpt", weights_only=True)
    assert len(losses) == ckpt["global_step"] >= 3 and all(np.isfinite(losses))  # one per optimizer step
    keys = list(ckpt["state_dict"])
    assert any(k.startswith("nets.student.") for k in keys)
    # the frozen teacher is identified by hash, not stored; with a LoRA critic only its adapters are
    assert not any(k.startswith("nets.teacher.") and "lora_" not in k for k in keys)
    assert ckpt["distill"]["frozen"]["teacher"]["sha256"] == load_teacher(f"diffusers:{root / 'model'}").source["sha256"]


@pytest.mark.parametrize("project,config", [("swiftbrush", "configs/sd21_base.yaml"),
                                            ("uni_instruct", "configs/cifar10_ddpm.yaml"),
                                            ("rcm", "configs/wan2.1_t2v_1.3b.yaml"),
                                            ("sana_sprint", "configs/sana_1.6b_1024px.yaml"),
                                            ("dmd2", "configs/sdxl_4step.yaml"),
                                            ("flash_dmd", "configs/sdxl_4step.yaml")])
def test_reproduce_script_submits_the_paper_config_through_the_slurm_launcher(project, config):
    import subprocess

    from test_launchers import ROOT

    p = subprocess.run([str(ROOT / "projects" / project / "reproduce.sh"), "--dry-run"], cwd=ROOT,
                       capture_output=True, text=True, timeout=120)
    assert p.returncode == 0, p.stderr
    assert "#SBATCH --ntasks-per-node=" in p.stdout and "#SBATCH --requeue" in p.stdout
    assert "srun " in p.stdout and f"launchers/fit.py projects/{project}/{config}" in p.stdout
