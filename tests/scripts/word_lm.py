"""A word-level RNN language model in the style of pytorch/examples word_language_model.

Unmodified training script: manual SGD update (no optimizer object), optional
clipping, torch.save of the whole model. Data is a synthetic corpus so the
script runs anywhere in seconds.
"""

import argparse
import math

import torch
import torch.nn as nn

parser = argparse.ArgumentParser(description="word-level RNN/LSTM language model")
parser.add_argument("--model", type=str, default="RNN_TANH", help="RNN_TANH, RNN_RELU, LSTM, GRU")
parser.add_argument("--emsize", type=int, default=32)
parser.add_argument("--nhid", type=int, default=32)
parser.add_argument("--nlayers", type=int, default=2)
parser.add_argument("--lr", type=float, default=20.0)
parser.add_argument("--clip", type=float, default=0.0, help="gradient clipping (0: none)")
parser.add_argument("--epochs", type=int, default=2)
parser.add_argument("--batch_size", type=int, default=10)
parser.add_argument("--bptt", type=int, default=35)
parser.add_argument("--init", type=float, default=0.1, help="uniform init range of the weights")
parser.add_argument("--seed", type=int, default=1111)
parser.add_argument("--save", type=str, default="model.pt")
args = parser.parse_args()

torch.manual_seed(args.seed)
ntokens = 200
corpus = torch.randint(0, ntokens, (4000,))


def batchify(data, bsz):
    nbatch = data.size(0) // bsz
    return data[: nbatch * bsz].view(bsz, -1).t().contiguous()


train_data = batchify(corpus, args.batch_size)


class RNNModel(nn.Module):
    def __init__(self, rnn_type, ntoken, ninp, nhid, nlayers):
        super().__init__()
        self.encoder = nn.Embedding(ntoken, ninp)
        if rnn_type in ("LSTM", "GRU"):
            self.rnn = getattr(nn, rnn_type)(ninp, nhid, nlayers)
        else:
            self.rnn = nn.RNN(ninp, nhid, nlayers, nonlinearity=rnn_type[4:].lower())
        self.decoder = nn.Linear(nhid, ntoken)
        self.rnn_type, self.nhid, self.nlayers = rnn_type, nhid, nlayers
        self.init_weights()

    def init_weights(self):
        nn.init.uniform_(self.encoder.weight, -0.1, 0.1)
        for w in self.rnn.parameters():
            nn.init.uniform_(w, -args.init, args.init)
        nn.init.zeros_(self.decoder.bias)
        nn.init.uniform_(self.decoder.weight, -0.1, 0.1)

    def forward(self, input, hidden):
        emb = self.encoder(input)
        output, hidden = self.rnn(emb, hidden)
        return self.decoder(output).view(-1, self.decoder.out_features), hidden

    def init_hidden(self, bsz):
        weight = next(self.parameters())
        if self.rnn_type == "LSTM":
            return (
                weight.new_zeros(self.nlayers, bsz, self.nhid),
                weight.new_zeros(self.nlayers, bsz, self.nhid),
            )
        return weight.new_zeros(self.nlayers, bsz, self.nhid)


def repackage_hidden(h):
    if isinstance(h, torch.Tensor):
        return h.detach()
    return tuple(repackage_hidden(v) for v in h)


def get_batch(source, i):
    seq_len = min(args.bptt, len(source) - 1 - i)
    return source[i : i + seq_len], source[i + 1 : i + 1 + seq_len].reshape(-1)


model = RNNModel(args.model, ntokens, args.emsize, args.nhid, args.nlayers)
criterion = nn.NLLLoss()


def train():
    model.train()
    hidden = model.init_hidden(args.batch_size)
    for i in range(0, train_data.size(0) - 1, args.bptt):
        data, targets = get_batch(train_data, i)
        model.zero_grad()
        hidden = repackage_hidden(hidden)
        output, hidden = model(data, hidden)
        loss = criterion(nn.functional.log_softmax(output, dim=-1), targets)
        loss.backward()
        if args.clip > 0:
            torch.nn.utils.clip_grad_norm_(model.parameters(), args.clip)
        for p in model.parameters():
            p.data.add_(p.grad, alpha=-args.lr)
    return loss.item()


for epoch in range(1, args.epochs + 1):
    last = train()
    print(f"| epoch {epoch} | loss {last:.2f} | ppl {math.exp(min(last, 50)):.1f}")
    with open(args.save, "wb") as f:
        torch.save(model, f)
with open(args.save, "rb") as f:
    model = torch.load(f, weights_only=False)
