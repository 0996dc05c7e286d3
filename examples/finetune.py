"""Fine-tune a model into an AHA model: add routers, train with lambda * mean(sigmoid(logits)).

Runs on a CPU in seconds with a tiny random OLMo-2 standing in for a real checkpoint;
for a real one, load it with AutoModelForCausalLM.from_pretrained(path) instead.
"""

import torch
from transformers import Olmo2Config, Olmo2ForCausalLM

from aha.hf import add_router
from aha.training import LAMBDA, GateStats, RouterSparsity


def main(steps=80, window=8, lam=LAMBDA, seq_len=64, lr=1e-2):
    torch.manual_seed(0)
    config = Olmo2Config(
        vocab_size=128,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        pad_token_id=0,
        eos_token_id=None,
    )
    model = add_router(Olmo2ForCausalLM(config), window=window)  # every gate starts All
    model.train()
    sparsity = RouterSparsity(model, lam=lam)  # the paper fine-tunes every weight, routers included
    opt = torch.optim.AdamW(model.parameters(), lr=lr)
    for step in range(steps):
        start, stride = torch.randint(1, 128, (8, 1)), torch.randint(1, 4, (8, 1))
        ids = (start + stride * torch.arange(seq_len)) % 128  # next = 2 * last - the one before: local
        lm = model(ids, labels=ids).loss
        loss = lm + sparsity()
        opt.zero_grad()
        loss.backward()
        opt.step()
        if step % 10 == 0 or step == steps - 1:
            print(f"step {step:3d}  lm loss {lm.item():.3f}  sparsity {sparsity().item():.2e}")
    model.eval()
    with torch.no_grad(), GateStats(model) as stats:
        model(ids)
    print(stats.summary())
    return {"lm_loss": lm.item(), "all_share": stats.all_share()}


if __name__ == "__main__":
    main()
