"""Architecture configs of the supported families, shipped so that loading never needs a hub.

The single-file loader starts from these and overrides every size it can read off the checkpoint's shapes (so tiny
test checkpoints load too); the benchmark builds random-weight models of exactly these shapes.
"""

from __future__ import annotations

import copy

_SD_SCHEDULE = {"beta_start": 0.00085, "beta_end": 0.012, "beta_schedule": "scaled_linear", "num_train_timesteps": 1000}

UNET_CONFIGS: dict[str, dict] = {
    "sd1": {
        "sample_size": 64, "in_channels": 4, "out_channels": 4, "layers_per_block": 2,
        "down_block_types": ["CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"],
        "up_block_types": ["UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"],
        "block_out_channels": [320, 640, 1280, 1280], "attention_head_dim": 8, "cross_attention_dim": 768,
        "norm_num_groups": 32, "use_linear_projection": False,
    },
    "sd2": {
        "sample_size": 96, "in_channels": 4, "out_channels": 4, "layers_per_block": 2,
        "down_block_types": ["CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"],
        "up_block_types": ["UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"],
        "block_out_channels": [320, 640, 1280, 1280], "attention_head_dim": [5, 10, 20, 20],
        "cross_attention_dim": 1024, "norm_num_groups": 32, "use_linear_projection": True,
    },
    "sdxl": {
        "sample_size": 128, "in_channels": 4, "out_channels": 4, "layers_per_block": 2,
        "down_block_types": ["DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"],
        "up_block_types": ["CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"],
        "block_out_channels": [320, 640, 1280], "attention_head_dim": [5, 10, 20],
        "transformer_layers_per_block": [1, 2, 10], "cross_attention_dim": 2048, "norm_num_groups": 32,
        "use_linear_projection": True, "addition_embed_type": "text_time", "addition_time_embed_dim": 256,
        "projection_class_embeddings_input_dim": 2816,
    },
}

TEXT_CONFIGS: dict[str, dict] = {
    "clip_l": {"vocab_size": 49408, "hidden_size": 768, "intermediate_size": 3072, "num_hidden_layers": 12,
               "num_attention_heads": 12, "max_position_embeddings": 77, "hidden_act": "quick_gelu",
               "projection_dim": 768},
    "openclip_h": {"vocab_size": 49408, "hidden_size": 1024, "intermediate_size": 4096, "num_hidden_layers": 23,
                   "num_attention_heads": 16, "max_position_embeddings": 77, "hidden_act": "gelu",
                   "projection_dim": 1024},
    "openclip_bigg": {"vocab_size": 49408, "hidden_size": 1280, "intermediate_size": 5120, "num_hidden_layers": 32,
                      "num_attention_heads": 20, "max_position_embeddings": 77, "hidden_act": "gelu",
                      "projection_dim": 1280},
}

FAMILY_TEXT_ENCODERS = {"sd1": ["clip_l"], "sd2": ["openclip_h"], "sdxl": ["clip_l", "openclip_bigg"]}
VAE_SCALING = {"sd1": 0.18215, "sd2": 0.18215, "sdxl": 0.13025}
VAE_CONFIG = {
    "in_channels": 3, "out_channels": 3, "latent_channels": 4, "layers_per_block": 2, "norm_num_groups": 32,
    "block_out_channels": [128, 256, 512, 512],
    "down_block_types": ["DownEncoderBlock2D"] * 4, "up_block_types": ["UpDecoderBlock2D"] * 4,
}


def unet_config(family: str) -> dict:
    return copy.deepcopy(UNET_CONFIGS[family])


def text_config(kind: str) -> dict:
    return copy.deepcopy(TEXT_CONFIGS[kind])


def schedule_config() -> dict:
    return dict(_SD_SCHEDULE)
