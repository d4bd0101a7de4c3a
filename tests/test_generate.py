from tunelab.models import create_model, load_tokenizer
from tunelab.serve.generate import complete


def test_batched_left_padded_generation_equals_one_by_one(tokenizer_dir):
    tok = load_tokenizer(tokenizer_dir)
    model = create_model("micro", "qwen2", tok, seed=3)
    prompts = ["river", "stone lantern baker harbour meadow", "山河湖海城村", "copper violet"]
    batched = complete(model, tok, prompts, max_new_tokens=6, batch_size=4)
    single = complete(model, tok, prompts, max_new_tokens=6, batch_size=1)
    assert batched == single and all(isinstance(s, str) for s in batched)
    assert tok.padding_side == "right"  # restored
