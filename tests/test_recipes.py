"""Recipes (configs/recipes), launcher configs (configs/accelerate) and run plans (reftune.plan).

Every recipe and every variant its header states must load with its config class, pass validate()
and plan within the hardware it names; the paper's settings must all be reachable with the
authors' hyperparameters; the accelerate configs must be what accelerate reads and agree with
reftune's `parallel` modes; the memory formula is checked against numbers worked out by hand.
Nothing here loads model weights or touches the network.
"""

from __future__ import annotations

import dataclasses
import math
import re
from pathlib import Path

import pytest
import yaml

from reftune import plan as P
from reftune import recipes as R
from reftune.trainers.distributed import PARALLEL_MODES
from reftune.trainers.reft import ReFTConfig
from reftune.trainers.sft import SFTConfig

ROOT = Path(__file__).resolve().parents[1]
RECIPES = sorted((ROOT / "configs" / "recipes").glob("*.yaml"))
ACCELERATE = sorted((ROOT / "configs" / "accelerate").glob("*.yaml"))
VARIANTS = [(r, v) for r in RECIPES for v in R.read_header(r)["variant"]]
GIB = 1024 ** 3


def _id(x) -> str:
    return x.name if isinstance(x, Path) else str(x).split(" | ")[0]


# --- every recipe and variant -------------------------------------------------------------------------

@pytest.mark.parametrize("path", RECIPES, ids=_id)
def test_recipe_loads_validates_and_fits_its_hardware(path):
    header = R.read_header(path)
    for key in ("recipe", "command", "launch", "hardware"):
        assert header.get(key), f"{path.name}: the header needs a `# {key}:` line"
    assert header["reported"] or header["peer"], f"{path.name}: state the reported / peer figures (or that none exist)"
    assert header["world_size"] and header["gpu_memory_gib"] and header["gpu"] in P.GPUS, header["hardware"]
    assert header["command"].startswith(f"reftune {header['reftune_command']} -c configs/recipes/{path.name}")
    cfg, header = R.load_recipe(path)
    assert not header["pending_fields"], (
        f"{path.name}: {header['pending_fields']} now exist in the config classes: move them from the "
        f"`# pending:` header into the YAML body")
    cfg.validate()
    plan = R.plan_recipe(path)
    assert plan.fits and plan.total_gib <= header["gpu_memory_gib"]
    assert plan.world_size == header["world_size"] or plan.kind == "compare"
    assert plan.hours is not None and plan.hours > 0, "every recipe gets a time estimate"
    if plan.kind in ("reft", "online_st"):
        assert plan.per_device["rollout_rows"] * plan.world_size == cfg.questions_per_step * cfg.samples_per_prompt
        assert plan.per_device["mini_batch"] * plan.world_size == cfg.mini_batch_size == plan.global_batch
    elif plan.kind == "sft":
        assert plan.global_batch == cfg.batch_size * cfg.grad_accum
        assert plan.per_device["micro_batch"] == math.ceil(cfg.batch_size / plan.world_size)


@pytest.mark.parametrize("path,line", VARIANTS, ids=[f"{p.stem}:{_id(v)}" for p, v in VARIANTS])
def test_variant_loads_validates_and_fits(path, line):
    variant = R.parse_variant(line)
    assert variant["overrides"], line
    cfg, _ = R.load_recipe(path, overrides=variant["overrides"])
    cfg.validate()
    assert R.plan_recipe(path, variant=variant).fits


@pytest.mark.parametrize("path", RECIPES, ids=_id)
def test_launch_line_agrees_with_the_recipe(path):
    """The launcher starts as many processes as the hardware line says, and an accelerate config's
    distributed type is the `parallel` mode the recipe sets."""
    header = R.read_header(path)
    cfg, _ = R.load_recipe(path)
    launch = header["launch"].split("   (")[0]  # what follows in parentheses is a comment
    parallel = getattr(cfg, "parallel", None) or getattr(getattr(cfg, "sft", None), "parallel", "ddp")
    if launch.startswith("torchrun"):
        procs = int(re.search(r"--nproc_per_node[ =](\d+)", launch).group(1))
        nodes = re.search(r"--nnodes[ =](\d+)", launch)
        assert procs * (int(nodes.group(1)) if nodes else 1) == header["world_size"]
    elif launch.startswith("accelerate launch"):
        acc_path = ROOT / re.search(r"--config_file (\S+)", launch).group(1)
        acc = yaml.safe_load(acc_path.read_text())
        procs = re.search(r"--num_processes[ =](\d+)", launch)
        assert (int(procs.group(1)) if procs else acc["num_processes"]) == header["world_size"]
        assert P.STRATEGIES[P.strategy_from_accelerate(acc)].reftune_parallel == parallel, (
            f"{path.name}: launched with {acc_path.name} but parallel={parallel}")
    else:
        assert launch.startswith(f"reftune {header['reftune_command']}") and header["world_size"] == 1
    assert " -m reftune.cli " in launch or launch.startswith("reftune ")


# --- the paper's settings ------------------------------------------------------------------------------

PAPER_STAGES = ("paper_sft.yaml", "paper_reft.yaml", "paper_online_st.yaml", "paper_offline_st.yaml")
# (data.name, style) -> (warm-up epoch, KL coefficient): ../shared/docs/reft-paper-notes.md
PAPER_SETTINGS = {("gsm8k_reft", "program"): (2, 0.01), ("gsm8k_reft", "nl"): (2, 0.05),
                  ("svamp", "program"): (2, 0.01), ("svamp", "nl"): (2, 0.05),
                  ("mathqa", "program"): (2, 0.01), ("mathqa", "nl"): (5, 0.05),
                  ("mathqa_numeric", "nl"): (10, 0.01)}


def _settings(name: str):
    """(model family, cfg) of the recipe and of each variant."""
    path = ROOT / "configs" / "recipes" / name
    header = R.read_header(path)
    out = []
    for variant in [None] + [R.parse_variant(v) for v in header["variant"]]:
        cfg, _ = R.load_recipe(path, overrides=variant["overrides"] if variant else None)
        model = getattr(cfg, "base_model", "") or (variant or {}).get("arch") or header.get("arch") or cfg.model
        out.append(("galactica" if "galactica" in model.lower() else "codellama", cfg))
    return out


@pytest.mark.parametrize("name", PAPER_STAGES)
def test_every_paper_setting_is_reachable(name):
    """Both models x every dataset and CoT style of the paper, once each, per stage."""
    seen = [(family, cfg.data.name, cfg.data.style) for family, cfg in _settings(name)]
    expected = {(f, d, s) for f in ("codellama", "galactica") for d, s in PAPER_SETTINGS}
    assert sorted(seen) == sorted(expected)
    out_dirs = [cfg.out_dir for _, cfg in _settings(name)]
    assert len(set(out_dirs)) == len(out_dirs), "every setting writes its own run folder"


@pytest.mark.parametrize("name", ("paper_reft.yaml", "paper_online_st.yaml"))
def test_paper_rl_budget_and_warmup(name):
    """300 epochs of 32-question steps from the right warm-up epoch; ReFT's KL per setting."""
    for family, cfg in _settings(name):
        warmup, kl = PAPER_SETTINGS[(cfg.data.name, cfg.data.style)]
        assert cfg.model.endswith(f"/sft/checkpoints/epoch-{warmup}") and family in cfg.model
        per_epoch = math.ceil(P.train_size(cfg.data) / cfg.questions_per_step)
        assert cfg.steps == 300 * per_epoch and cfg.eval_every == cfg.save_every == per_epoch
        assert cfg.data.program_header_in_prompt == (cfg.data.style == "program")
        assert (cfg.questions_per_step, cfg.samples_per_prompt, cfg.mini_batch_size, cfg.lr) == (32, 1, 32, 3e-7)
        assert cfg.data.max_prompt_tokens + cfg.max_new_tokens == 700 and cfg.temperature == 1.0 and cfg.top_p == 1.0
        assert (cfg.dtype, cfg.mixed_precision) == ("float32", "bf16"), "fp32 master weights, as the release"
        if name == "paper_reft.yaml":
            assert cfg.kl_coef == kl and cfg.kl_estimator == "k1" and cfg.kl_in_reward
            assert (cfg.ppo_epochs, cfg.clip, cfg.vf_clip, cfg.vf_coef, cfg.gamma, cfg.lam) == (2, 0.2, 0.2, 5.0, 1.0, 0.95)
            assert (cfg.value_dropout, cfg.advantage, cfg.whiten_advantages) == (0.1, "gae", True)
            assert (cfg.score_correct, cfg.score_wrong, cfg.score_none) == (1.0, 0.1, 0.0)
        else:
            assert (cfg.update_epochs, cfg.own_weight) == (2, 0.5)


def test_paper_supervised_and_inference_hyperparameters():
    for _, cfg in _settings("paper_sft.yaml"):
        warmup, _ = PAPER_SETTINGS[(cfg.data.name, cfg.data.style)]
        assert (cfg.epochs, cfg.lr, cfg.warmup_ratio, cfg.batch_size * cfg.grad_accum, cfg.max_length) == (40, 1e-5, 0.1, 48, 1024)
        assert warmup in cfg.save_epochs and cfg.eval_split == "validation"
    for family, cfg in _settings("paper_offline_st.yaml"):
        warmup, _ = PAPER_SETTINGS[(cfg.data.name, cfg.data.style)]
        assert cfg.warmup_model.endswith(f"epoch-{warmup}") and (cfg.k, cfg.max_per_question, cfg.temperature) == (100, 10, 1.0)
        assert cfg.base_model == {"codellama": "codellama/CodeLlama-7b-hf", "galactica": "facebook/galactica-6.7b"}[family]
        assert (cfg.sft.epochs, cfg.sft.lr, cfg.sft.batch_size * cfg.sft.grad_accum) == (20, 1e-5, 48)
    for _, cfg in _settings("paper_compare.yaml"):
        assert (cfg.k, cfg.rm_k, cfg.temperature, cfg.rm.epochs, cfg.rm.lr, cfg.rm.batch_size, cfg.rm.max_length) == (
            100, 100, 1.0, 3, 1e-6, 24, 700)


def test_paper_reported_numbers_are_stated():
    """The figures of ../shared/docs/reft-paper-notes.md appear in the recipes' headers."""
    text = lambda name: "\n".join(R.read_header(ROOT / "configs" / "recipes" / name)["reported"]  # noqa: E731
                                  + [R.parse_variant(v)["reported"] for v in R.read_header(ROOT / "configs" / "recipes" / name)["variant"]])
    for number in ("63.00", "63.68", "68.0", "77.0", "48.37", "58.83", "62.9", "73.4", "43.59", "75.40", "56.01"):
        assert number in text("paper_sft.yaml"), number
    for number in ("75.28", "78.0", "81.2", "68.91", "71.9", "76.4", "53.30", "79.19", "60.13"):
        assert number in text("paper_reft.yaml"), number
    assert "75.28" in text("paper_compare.yaml") and "81.2" in text("paper_compare.yaml")


def test_modern_recipes_cover_qwen_full_and_lora():
    names = {p.name for p in RECIPES}
    for model in ("qwen2.5-0.5b-instruct", "qwen2.5-1.5b"):
        assert {f"{model}_gsm8k_sft.yaml", f"{model}_gsm8k_reft.yaml", f"{model}_gsm8k_reft_lora.yaml"} <= names
    header = R.read_header(ROOT / "configs" / "recipes" / "qwen2.5-0.5b-instruct_gsm8k_reft.yaml")
    assert any("56.7" in p and "veRL" in p for p in header["peer"])
    for name in ("qwen2.5-0.5b-instruct_gsm8k_reft_lora.yaml", "qwen2.5-1.5b_gsm8k_reft_lora.yaml"):
        cfg, _ = R.load_recipe(ROOT / "configs" / "recipes" / name)
        assert getattr(cfg, "lora_r", 0) > 0, f"{name} is a LoRA recipe"
        assert R.plan_recipe(ROOT / "configs" / "recipes" / name).memory_gib["reference"] == 0


# --- accelerate launcher configs -------------------------------------------------------------------------

# accelerate 1.15's ClusterConfig fields (accelerate/commands/config/config_args.py), the keys its
# `fsdp_config` / `deepspeed_config` sections map to `accelerate launch` options (commands/launch.py),
# and the FSDP1-only keys FSDP2 configs leave out (commands/config/cluster.py asks them only for v1).
CLUSTER_KEYS = {"compute_environment", "distributed_type", "mixed_precision", "use_cpu", "debug", "num_processes",
                "machine_rank", "num_machines", "gpu_ids", "main_process_ip", "main_process_port", "rdzv_backend",
                "same_network", "main_training_function", "enable_cpu_affinity", "fp8_config", "deepspeed_config",
                "fsdp_config", "parallelism_config", "megatron_lm_config", "mpirun_config", "downcast_bf16",
                "tpu_name", "tpu_zone", "tpu_use_cluster", "tpu_use_sudo", "command_file", "commands", "tpu_vm",
                "tpu_env", "dynamo_config"}
FSDP_KEYS = {"fsdp_version", "fsdp_offload_params", "fsdp_min_num_params", "fsdp_sharding_strategy",
             "fsdp_reshard_after_forward", "fsdp_auto_wrap_policy", "fsdp_transformer_layer_cls_to_wrap",
             "fsdp_backward_prefetch", "fsdp_state_dict_type", "fsdp_forward_prefetch", "fsdp_use_orig_params",
             "fsdp_cpu_ram_efficient_loading", "fsdp_sync_module_states", "fsdp_activation_checkpointing",
             "fsdp_activation_checkpointing_offload"}
FSDP1_ONLY = {"fsdp_sharding_strategy", "fsdp_backward_prefetch", "fsdp_forward_prefetch", "fsdp_use_orig_params"}
DEEPSPEED_KEYS = {"deepspeed_config_file", "zero_stage", "offload_optimizer_device", "offload_param_device",
                  "offload_optimizer_nvme_path", "offload_param_nvme_path", "gradient_accumulation_steps",
                  "gradient_clipping", "zero3_init_flag", "zero3_save_16bit_model", "deepspeed_hostfile",
                  "deepspeed_exclusion_filter", "deepspeed_inclusion_filter", "deepspeed_multinode_launcher",
                  "deepspeed_moe_layer_cls_names"}


@pytest.mark.parametrize("path", ACCELERATE, ids=_id)
def test_accelerate_config_schema(path):
    c = yaml.safe_load(path.read_text())
    assert set(c) <= CLUSTER_KEYS, set(c) - CLUSTER_KEYS
    assert c["compute_environment"] == "LOCAL_MACHINE" and c["mixed_precision"] in ("no", "bf16")
    assert isinstance(c["num_processes"], int) and c["num_processes"] >= 2 and c["num_machines"] >= 1
    strategy = P.strategy_from_accelerate(c)
    if c["distributed_type"] == "FSDP":
        f = c["fsdp_config"]
        assert set(f) <= FSDP_KEYS - FSDP1_ONLY and f["fsdp_version"] == 2
        assert isinstance(f["fsdp_reshard_after_forward"], bool)  # FSDP2: a bool, not a sharding strategy
        assert f["fsdp_auto_wrap_policy"] in ("TRANSFORMER_BASED_WRAP", "SIZE_BASED_WRAP", "NO_WRAP")
        assert f["fsdp_state_dict_type"] in ("SHARDED_STATE_DICT", "FULL_STATE_DICT")
    if c["distributed_type"] == "DEEPSPEED":
        d = c["deepspeed_config"]
        assert set(d) <= DEEPSPEED_KEYS and d["zero_stage"] in (2, 3)
        assert d["offload_optimizer_device"] in ("none", "cpu", "nvme") and d["offload_param_device"] in ("none", "cpu", "nvme")
    # Agreement with reftune: a reftune mode is named as such; a DeepSpeed file says reftune does not use it.
    parallel = P.STRATEGIES[strategy].reftune_parallel
    if parallel is None:
        assert "reftune parallel: none" in path.read_text()
    else:
        assert parallel in PARALLEL_MODES and f"`parallel: {parallel}`" in path.read_text()


def test_every_reftune_parallel_mode_has_a_launcher_config():
    modes = {P.STRATEGIES[P.strategy_from_accelerate(yaml.safe_load(p.read_text()))].reftune_parallel for p in ACCELERATE}
    assert set(PARALLEL_MODES) <= modes
    assert {P.strategy_from_accelerate(yaml.safe_load(p.read_text())) for p in ACCELERATE} == set(P.STRATEGIES)


@pytest.mark.parametrize("path", ACCELERATE, ids=_id)
def test_accelerate_reads_the_config(path, monkeypatch):
    """accelerate's own loader and launcher: the file parses into its ClusterConfig, `accelerate launch`
    turns it into the environment the processes get, and the FSDP / DeepSpeed plugin accepts it."""
    pytest.importorskip("accelerate", reason="accelerate is not installed (pip install accelerate)")
    from accelerate.commands.config.config_args import ClusterConfig
    from accelerate.commands.launch import _validate_launch_command, launch_command_parser
    from accelerate.utils import DeepSpeedPlugin, FullyShardedDataParallelPlugin
    from accelerate.utils.launch import prepare_deepspeed_cmd_env, prepare_multi_gpu_env

    ClusterConfig.from_yaml_file(str(path))  # unknown keys raise
    args = launch_command_parser().parse_args(["--config_file", str(path), "-m", "reftune.cli", "train", "-c", "r.yaml"])
    args, defaults, _ = _validate_launch_command(args)
    assert args.module and args.training_script == "reftune.cli" and args.num_processes == defaults.num_processes
    if args.use_deepspeed:
        args.deepspeed_fields_from_accelerate_config = ",".join(defaults.deepspeed_config)
        _, env = prepare_deepspeed_cmd_env(args)
    else:
        env = prepare_multi_gpu_env(args)
    for key, value in env.items():
        if key.startswith(("ACCELERATE_", "FSDP_")):
            monkeypatch.setenv(key, value)
    strategy = P.strategy_from_accelerate(yaml.safe_load(path.read_text()))
    if strategy == "fsdp2":
        plugin = FullyShardedDataParallelPlugin()
        assert plugin.fsdp_version == 2 and plugin.reshard_after_forward is True
    elif strategy.startswith("zero"):
        assert DeepSpeedPlugin().zero_stage == int(strategy[-1])
    else:
        assert env.get("ACCELERATE_USE_FSDP") is None and env.get("ACCELERATE_USE_DEEPSPEED") is None


# --- the memory formula, worked by hand ---------------------------------------------------------------------

QWEN05 = P.KNOWN_MODELS["qwen/qwen2.5-0.5b"]


def test_known_architectures_match_their_published_sizes():
    for spec in P.KNOWN_MODELS.values():
        assert spec.params == pytest.approx(spec.published_params, rel=0.015), spec.name
    assert QWEN05.params == 494_032_768  # Qwen2.5-0.5B's exact count (tied embeddings, q/k/v biases)


def test_memory_by_hand_qwen05b_sft():
    """Qwen2.5-0.5B, one device, SFT micro-batch b=4 of S=512 tokens, no evaluation (no KV cache).

    N = 494,032,768. fp32 master weights + bf16 autocast (w = 4, a = 2):
      weights = grads = 4N = 1,976,131,072 B = 1.8404 GiB; AdamW = 8N = 3,952,262,144 B = 3.6808 GiB
      activations: per token per layer 6*896 + 2*128 (kv_dim = 2 heads x 64) + 4*4864 = 25,088 values,
        x 2 B x 4 x 512 x 24 layers = 2,466,250,752 B = 2.2969 GiB
      gradient checkpointing: 4*512*896*2*24 + 4*512*25,088*2 = 88,080,384 + 102,760,448 = 190,840,832 B
      logits: 4 x 151,936 x 512 x (2*2 + 12) = 4,978,638,848 B = 4.6367 GiB, with or without
        logprob_chunk_size (cross-entropy updates never chunk; only log-prob passes do)
      total = (16N + 2,466,250,752 + 4,978,638,848) x 1.1 / 2^30 + 1.5 = 17.22 GiB
    bf16 weights (w = a = 2): weights = grads = 2N = 988,065,536 B, AdamW 4N.
    LoRA r=8 on q_proj (896 -> 896) and v_proj (896 -> 128): 24 x 8 x (1792 + 1024) = 540,672 params;
      weights = 2N + 4 x 540,672 = 990,228,224 B, grads 2,162,688 B, AdamW 4,325,376 B (fp32 adapters).
    """
    base = SFTConfig(model="Qwen/Qwen2.5-0.5B", batch_size=4, max_length=512, eval_split="none",
                     dtype="float32", mixed_precision="bf16")
    m = P.plan_run(base, 1, model_spec=QWEN05).memory_gib
    assert m["weights"] * GIB == m["grads"] * GIB == 1_976_131_072 and m["optimizer"] * GIB == 3_952_262_144
    assert m["activations"] * GIB == 2_466_250_752 and m["logits"] * GIB == 4_978_638_848 and m["kv_cache"] == 0
    assert P.plan_run(base, 1, model_spec=QWEN05).total_gib == pytest.approx(17.22, abs=0.01)

    gc = dataclasses.replace(base)
    object.__setattr__(gc, "gradient_checkpointing", True)  # the planner reads it once the field exists
    object.__setattr__(gc, "logprob_chunk_size", 128)
    m = P.plan_run(gc, 1, model_spec=QWEN05).memory_gib
    assert m["activations"] * GIB == 190_840_832 and m["logits"] * GIB == 4_978_638_848

    bf16 = dataclasses.replace(base, dtype="bfloat16", mixed_precision="no")
    m = P.plan_run(bf16, 1, model_spec=QWEN05).memory_gib
    assert m["weights"] * GIB == 988_065_536 and m["optimizer"] * GIB == 4 * QWEN05.params

    lora = dataclasses.replace(bf16)
    object.__setattr__(lora, "lora_r", 8)
    object.__setattr__(lora, "lora_target_modules", ["q_proj", "v_proj"])
    plan = P.plan_run(lora, 1, model_spec=QWEN05)
    assert plan.trainable_params == 540_672
    assert plan.memory_gib["weights"] * GIB == 990_228_224 and plan.memory_gib["grads"] * GIB == 2_162_688
    assert plan.memory_gib["optimizer"] * GIB == 4_325_376


def test_memory_by_hand_qlora_base():
    """Qwen2.5-0.5B, LoRA r=8 on q_proj/v_proj, base quantized (lora_quantize).

    Decoder linear weights per layer: q, o 896 x 896 = 802,816; k, v 896 x 128 = 114,688;
      gate, up, down 896 x 4864 = 4,358,144: 14,909,440, x 24 layers = 357,826,560.
    The rest (embedding, norms, q/k/v biases) N - 357,826,560 = 136,206,208, in fp32 (peft casts it).
    nf4: 357,826,560 x 0.516 + 136,206,208 x 4 + 4 x 540,672 (fp32 adapters)
       = 184,638,504.96 + 544,824,832 + 2,162,688 = 731,626,024.96 B
    int8: 357,826,560 + 544,824,832 + 2,162,688 = 904,814,080 B; no reference copy in either.
    """
    cfg = ReFTConfig(model="Qwen/Qwen2.5-0.5B", questions_per_step=32, mini_batch_size=8, dtype="bfloat16",
                     lora_r=8, lora_target_modules=["q_proj", "v_proj"], lora_quantize="nf4")
    plan = P.plan_run(cfg, 1, model_spec=QWEN05)
    assert plan.memory_gib["weights"] * GIB == pytest.approx(731_626_024.96) and plan.memory_gib["reference"] == 0
    int8 = P.plan_run(dataclasses.replace(cfg, lora_quantize="int8"), 1, model_spec=QWEN05)
    assert int8.memory_gib["weights"] * GIB == pytest.approx(904_814_080)
    assert int8.memory_gib["grads"] == plan.memory_gib["grads"]  # the adapters train the same way


def test_reference_copy_and_sharding_rules():
    """ReFT: a full reference without LoRA, none with it; fsdp2 shards weights, grads and AdamW states
    by W and adds the unsharded rollout replica; ddp adds its gradient buckets."""
    cfg = ReFTConfig(model="Qwen/Qwen2.5-0.5B", questions_per_step=32, mini_batch_size=8, dtype="float32")
    one = P.plan_run(cfg, 1).memory_gib
    assert one["reference"] == pytest.approx(4 * QWEN05.params / GIB) and one["replica"] == one["ddp_buckets"] == 0
    fsdp = P.plan_run(dataclasses.replace(cfg, parallel="fsdp2"), 4).memory_gib
    assert fsdp["weights"] == pytest.approx(one["weights"] / 4) and fsdp["optimizer"] == pytest.approx(one["optimizer"] / 4)
    assert fsdp["replica"] == pytest.approx(one["weights"]) and fsdp["gathered"] > 0
    ddp = P.plan_run(cfg, 4).memory_gib
    assert ddp["weights"] == one["weights"] and ddp["ddp_buckets"] == pytest.approx(one["grads"])
    lora = dataclasses.replace(cfg)
    object.__setattr__(lora, "lora_r", 16)
    assert P.plan_run(lora, 1).memory_gib["reference"] == 0
    z2 = P.plan_run(cfg, 4, strategy="zero2").memory_gib
    assert z2["weights"] == one["weights"] and z2["grads"] == pytest.approx(one["grads"] / 4)


def test_reft_gradient_accumulation_plans_smaller_micro_batches():
    """micro_batch_size m: each device runs its mini-batch share as share/m forwards of m rows, so the
    activations and logits scale by m/share; the optimizer step and the global batch stay."""
    cfg = ReFTConfig(model="Qwen/Qwen2.5-0.5B", questions_per_step=32, mini_batch_size=8, dtype="float32")
    whole, acc = P.plan_run(cfg, 2), P.plan_run(dataclasses.replace(cfg, micro_batch_size=2), 2)
    assert (whole.grad_accum, acc.grad_accum) == (1, 2) and whole.global_batch == acc.global_batch == 8
    assert acc.per_device["micro_batch"] == 2 and "micro_batch" not in whole.per_device
    assert acc.optimizer_steps == whole.optimizer_steps
    for key in ("activations", "logits"):
        assert acc.memory_gib[key] == pytest.approx(whole.memory_gib[key] / 2), key
    with pytest.raises(P.PlanError, match="micro_batch_size=4 does not divide the 2 rows per device"):
        P.plan_run(dataclasses.replace(cfg, micro_batch_size=4), 4)


def test_impossible_plans_are_clear_errors():
    cfg = ReFTConfig(model="Qwen/Qwen2.5-0.5B", questions_per_step=30, mini_batch_size=8)
    with pytest.raises(P.PlanError, match="questions_per_step=30 does not split over 4 devices"):
        P.plan_run(cfg, 4)
    with pytest.raises(P.PlanError, match="mini_batch_size=6 does not split over 4"):
        P.plan_run(dataclasses.replace(cfg, questions_per_step=32, mini_batch_size=6), 4)
    with pytest.raises(P.PlanError, match=r"needs about .* GiB per device, more than 8 GiB"):
        P.plan_run(dataclasses.replace(cfg, questions_per_step=32), 1, gpu_memory_gib=8)
    with pytest.raises(P.PlanError, match="no architecture for model 'runs/x'"):
        P.plan_run(dataclasses.replace(cfg, model="runs/x", questions_per_step=32), 1)
    with pytest.raises(P.PlanError, match="vLLM's share"):
        P.plan_run(dataclasses.replace(cfg, model="Qwen/Qwen2.5-7B", questions_per_step=32, engine="vllm"), 1,
                   gpu_memory_gib=24)
    with pytest.raises(P.PlanError, match="fsdp_version 1"):
        P.strategy_from_accelerate({"distributed_type": "FSDP", "fsdp_config": {"fsdp_version": 1}})


def test_local_config_json_matches_transformers_parameter_counts(tmp_path):
    """A local folder's config.json (Llama, Qwen2, OPT shapes): the planner's count equals the model's."""
    transformers = pytest.importorskip("transformers")
    configs = {
        "llama": transformers.LlamaConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                                          num_attention_heads=4, num_key_value_heads=2, vocab_size=300),
        "qwen2": transformers.Qwen2Config(hidden_size=64, intermediate_size=96, num_hidden_layers=2,
                                          num_attention_heads=4, num_key_value_heads=2, vocab_size=300,
                                          tie_word_embeddings=True),
        "opt": transformers.OPTConfig(hidden_size=64, ffn_dim=128, num_hidden_layers=2, num_attention_heads=4,
                                      vocab_size=300, max_position_embeddings=64, word_embed_proj_dim=64),
    }
    for name, config in configs.items():
        folder = tmp_path / name
        folder.mkdir()
        config.save_pretrained(folder)
        model = transformers.AutoModelForCausalLM.from_config(config)
        assert P.resolve_model_spec(str(folder)).params == sum(p.numel() for p in model.parameters()), name
    plan = P.plan_run(SFTConfig(model=str(tmp_path / "llama"), batch_size=2, max_length=32), 1, gpu_memory_gib=8)
    assert plan.fits and plan.params == P.spec_from_config_json(tmp_path / "llama" / "config.json").params


# --- docs and CLI ----------------------------------------------------------------------------------------------

def test_scaling_doc_table_is_the_planners():
    doc = (ROOT / "docs" / "scaling.md").read_text()
    table = re.search(r"<!-- plan-table:start -->\n(.*?)\n<!-- plan-table:end -->", doc, re.S).group(1)
    expected = R.markdown_table(RECIPES)
    assert table == expected, "docs/scaling.md is stale: python -m reftune.recipes --table configs/recipes/*.yaml"


def test_cli(capsys):
    path = str(ROOT / "configs" / "recipes" / "paper_reft.yaml")
    assert R.main(["-c", path]) == 0
    out = capsys.readouterr().out
    assert "reft: codellama/CodeLlama-7b-hf on 8 device(s), fsdp2" in out and "GiB" in out
    assert R.main(["-c", path, "--command", "train", "--world-size", "6"]) == 2
    assert "questions_per_step=32 does not split over 6 devices" in capsys.readouterr().err
    assert R.main(["-c", path, "--world-size", "8", "--gpu-memory", "40"]) == 2
