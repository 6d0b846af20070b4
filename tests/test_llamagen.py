import pytest
import torch
from reference_sampling import reference_tokens

from conftest import random_llamagen
from quantcore.errors import ConfigError
from quantcore.fastgen import generate_tokens
from quantcore.models.llamagen import (
    MODELS,
    LlamaGen,
    LlamaGenConfig,
    attention_mask,
    generation_order,
    par_guidance_on,
    rope_table,
    to_raster,
    token_positions,
)

# Official sizes (LlamaGen README / gpt.py comments); PAR adds only its special-token table.
OFFICIAL_PARAMS = {
    "llamagen-b": 111e6,
    "llamagen-l": 343e6,
    "llamagen-xl": 775e6,
    "llamagen-xxl": 1.4e9,
    "llamagen-3b": 3.1e9,
    "par-xl-4x": 775e6,
    "par-xxl-4x": 1.4e9,
    "par-3b-4x": 3.1e9,
}


@pytest.mark.parametrize("name", sorted(OFFICIAL_PARAMS))
def test_full_size_parameter_counts(name):
    with torch.device("meta"):
        model = LlamaGen(MODELS[name].config)
    count = sum(p.numel() for p in model.parameters())
    assert abs(count - OFFICIAL_PARAMS[name]) / OFFICIAL_PARAMS[name] < 0.01, count


def test_official_key_names():
    with torch.device("meta"):
        keys = set(LlamaGen(MODELS["par-xl-4x"].config).state_dict())
    for key in [
        "cls_embedding.embedding_table.weight",
        "tok_embeddings.weight",
        "spe_tok_embeddings.special_embeddings.weight",
        "layers.0.attention.wqkv.weight",
        "layers.0.attention.wo.weight",
        "layers.35.feed_forward.w1.weight",
        "layers.35.feed_forward.w2.weight",
        "layers.35.feed_forward.w3.weight",
        "layers.0.attention_norm.weight",
        "layers.0.ffn_norm.weight",
        "norm.weight",
        "output.weight",
    ]:
        assert key in keys
    assert not any("cache" in k or "rope" in k or "mask" in k for k in keys)
    assert len(keys) == 3 + 36 * 7 + 2


def test_ffn_hidden_sizes_match_official():
    assert [MODELS[n].config.ffn_hidden for n in ("llamagen-xl", "llamagen-xxl", "llamagen-3b")] == [
        3584,
        4096,
        8704,
    ]


def test_par_layout_matches_reference():
    cfg = MODELS["par-xl-4x"].config
    assert cfg.seq_len == 576
    order = generation_order(cfg)
    # first four generated tokens: the top-left token of each 12x12 region
    assert order[:4].tolist() == [0, 12, 12 * 24, 12 * 24 + 12]
    assert sorted(order.tolist()) == list(range(576))
    slots = token_positions(cfg)
    assert slots[:5].tolist() == [1, 2, 3, 4, 8]
    table = rope_table(cfg)
    assert table[0].abs().sum() == 0 and table[5:8].abs().sum() == 0  # cls and the 3 special slots
    assert table[4].abs().sum() > 0
    mask = attention_mask(cfg)
    assert mask[4, 7] and mask[5, 4] and not mask[3, 4] and mask[8, 11] and not mask[7, 8]
    assert mask[:, 0].all()


def test_bad_config_is_refused():
    with pytest.raises(ConfigError, match="par_regions"):
        LlamaGenConfig(dim=64, n_layer=1, n_head=4, grid_size=5, par_regions=4)
    with pytest.raises(ConfigError, match="n_head"):
        LlamaGenConfig(dim=63, n_layer=1, n_head=4)


@pytest.mark.parametrize("name", ["llamagen-tiny", "par-tiny"])
def test_kv_cache_sampling_matches_full_recomputation(name):
    model = random_llamagen(name, dtype=torch.float64)
    classes = torch.tensor([1, 5, 9])
    settings = (
        {"cfg_scale": 2.0},
        {"cfg_scale": 2.0, "cfg_interval": 3},
        {"cfg_scale": 1.0, "top_k": 8, "top_p": 0.9, "temperature": 0.7},
    )
    for kwargs in settings:
        cached = generate_tokens(model, classes, [3, 4, 5], **kwargs)
        full = reference_tokens(model, classes, [3, 4, 5], **kwargs)
        assert torch.equal(cached, full)
        assert len(set(cached.flatten().tolist())) > 4  # not a degenerate constant sequence


@pytest.mark.parametrize(
    "cfg_interval, guided",
    [
        (-1, list(range(10))),
        # prefill; AR tokens 1..3 counted i = 0, 1, 2; parallel steps counted i = 0, 4, 8, ...
        (0, [0, 1, 4]),
        (1, [0, 1, 2, 4]),
        (5, [0, 1, 2, 3, 4, 5]),
        (8, [0, 1, 2, 3, 4, 5, 6]),
    ],
)
def test_par_cfg_interval_counts_as_the_official_sampler(cfg_interval, guided):
    assert [s for s in range(10) if par_guidance_on(s, 4, cfg_interval)] == guided


@pytest.mark.parametrize("name", ["llamagen-tiny", "par-tiny"])
@pytest.mark.parametrize("cfg_interval", [0, 2, 5])
def test_greedy_cfg_interval_matches_the_official_counting(name, cfg_interval):
    """Greedy decoding, token for token against the uncached oracle that counts as the official loops."""
    model = random_llamagen(name, dtype=torch.float64)
    classes = torch.tensor([1, 5, 9])
    greedy = {"cfg_scale": 4.0, "top_k": 1}
    tokens = generate_tokens(model, classes, [0, 1, 2], cfg_interval=cfg_interval, **greedy)
    assert torch.equal(
        tokens, reference_tokens(model, classes, [0, 1, 2], cfg_interval=cfg_interval, **greedy)
    )
    # the interval matters: guiding every step draws other tokens
    assert not torch.equal(tokens, generate_tokens(model, classes, [0, 1, 2], cfg_interval=-1, **greedy))


@pytest.mark.parametrize("name", ["llamagen-tiny", "par-tiny"])
def test_cached_logits_equal_teacher_forced_logits(name):
    model = random_llamagen(name, dtype=torch.float64)
    classes = torch.tensor([2, 3])
    tokens = generate_tokens(model, classes, [0, 1], cfg_scale=1.0)
    teacher = model.sequence_logits(classes, tokens)
    # re-run the cached decoder, collecting the logits of each step
    from quantcore.models.llamagen import _next_inputs

    inputs = model.embed_sequence(classes, tokens)  # the cached steps feed these slots

    model.setup_caches(2)
    collected, produced = [], 0
    while produced < model.config.num_tokens:
        pos = _next_inputs(model.config, model.token_slots, produced)
        collected.append(model(inputs[:, pos], pos, use_cache=True))
        produced += pos.numel()
    model.clear_caches()
    # RoPE and the logits run in fp32 as in the official code, so agreement is to fp32 precision
    torch.testing.assert_close(torch.cat(collected, dim=1), teacher, rtol=1e-4, atol=1e-5)


def test_seed_determines_image_independent_of_batch():
    model = random_llamagen("llamagen-tiny")
    alone = generate_tokens(model, torch.tensor([4]), [11], cfg_scale=2.0)
    batched = generate_tokens(model, torch.tensor([1, 4, 7]), [10, 11, 12], cfg_scale=2.0)
    assert torch.equal(alone[0], batched[1])
    assert not torch.equal(batched[0], batched[1])


def test_to_raster_inverts_generation_order():
    model = random_llamagen("par-tiny")
    gen = torch.arange(16)[None]
    raster = to_raster(model, gen)
    assert torch.equal(raster[0, model.order], gen[0])


def test_seed_count_must_match():
    model = random_llamagen("llamagen-tiny")
    with pytest.raises(ConfigError, match="one seed per image"):
        generate_tokens(model, torch.tensor([1, 2]), [0], cfg_scale=2.0)
