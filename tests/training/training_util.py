"""The tiny training run the training and evaluation tests share."""

from glm47.training.recipe import TrainConfig

TINY = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2, num_key_value_heads=1,
            head_dim=16, moe_intermediate_size=16, n_routed_experts=4, num_experts_per_tok=2, n_shared_experts=1,
            first_k_dense_replace=1, n_group=1, topk_group=1, norm_topk_prob=True, routed_scaling_factor=1.0,
            use_qk_norm=True, attention_bias=True, rope_theta=10000.0, partial_rotary_factor=0.5,
            num_nextn_predict_layers=1, max_position_embeddings=2048)
TINY_RUN = TrainConfig(examples=24, vocab_size=400, steps=4, batch_size=4, warmup_steps=1, save_every=100, model=TINY)
