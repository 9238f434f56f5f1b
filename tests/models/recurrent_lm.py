"""Checks every language model with a constant-size recurrent state (tritium.models.ssm.RecurrentLM) passes."""
import torch


def check_greedy_generate(model) -> torch.Tensor:
    """model.generate's greedy tokens equal the argmax of full forwards over the growing sequence, zero new tokens
    return the prompt, and sampling keeps the prompt and the length. Returns the prompt (batch 2, 5 tokens)."""
    prompt = torch.randint(0, model.config.vocab_size, (2, 5))
    tokens = model.generate(prompt, 6)
    seq = prompt
    with torch.no_grad():
        for _ in range(6):
            seq = torch.cat([seq, model(seq)[:, -1].argmax(-1, keepdim=True)], 1)
    assert torch.equal(tokens, seq)
    assert torch.equal(model.generate(prompt, 0), prompt)
    sampled = model.generate(prompt, 4, greedy=False, generator=torch.Generator().manual_seed(0))
    assert sampled.shape == (2, 9) and torch.equal(sampled[:, :5], prompt)
    return prompt
