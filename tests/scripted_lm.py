"""An lm-eval model that generates from a script: `scripted_lm(reply)` answers each generation request with
`reply(task_name, chat, gen_kwargs)`. Its chat template keeps the chat as JSON, so the reply function sees the
messages the task built; every request and reply is recorded in `lm.requests[task] = [(chat, gen_kwargs, reply)]`.
Log-likelihood requests are not scripted (the tasks that use it are MC ones)."""

from __future__ import annotations

import json


def scripted_lm(reply):
    from lm_eval.api.model import LM

    class Scripted(LM):
        def __init__(self):
            super().__init__()
            self.requests: dict = {}

        def apply_chat_template(self, chat_history, add_generation_prompt=True):
            return json.dumps(chat_history)

        @property
        def tokenizer_name(self):
            return "scripted"

        def generate_until(self, requests, disable_tqdm=False):
            answers = []
            for request in requests:
                context, gen_kwargs = request.args
                chat = json.loads(context)
                answer = reply(request.task_name, chat, gen_kwargs)
                self.requests.setdefault(request.task_name, []).append((chat, gen_kwargs, answer))
                answers.append(answer)
            return answers

        def loglikelihood(self, requests, disable_tqdm=False):
            raise NotImplementedError

        def loglikelihood_rolling(self, requests, disable_tqdm=False):
            raise NotImplementedError

    return Scripted()
