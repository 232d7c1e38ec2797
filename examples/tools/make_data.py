"""Writes train.jsonl, valid.jsonl and test.jsonl: Northwind Bikes support chats in which the assistant
calls one of two functions, or answers without one. Run it again to get the same files (seeded).

- get_order_status(order_id): where an order is. Order ids look like NW-48213.
- book_service(bike_model, date): a workshop appointment, the date as YYYY-MM-DD.
- about a third of the questions need no function (opening hours, returns, sizing): a plain answer.

Half of the training chats go on after the call: the function's result comes back as a `tool` message and
the assistant answers from it. test.jsonl is one request a line with the call it should get (`expected`),
phrased with templates the training data never uses, for measure.py.
"""

from __future__ import annotations

import json
import random
from pathlib import Path

HERE = Path(__file__).parent
SYSTEM = "You are the support assistant for Northwind Bikes. Use the functions when they help; be brief."
TOOLS = [
    {
        "type": "function",
        "function": {
            "name": "get_order_status",
            "description": "Look up where a customer's order is.",
            "parameters": {
                "type": "object",
                "properties": {"order_id": {"type": "string", "description": "like NW-48213"}},
                "required": ["order_id"],
            },
        },
    },
    {
        "type": "function",
        "function": {
            "name": "book_service",
            "description": "Book a workshop service appointment for a bike.",
            "parameters": {
                "type": "object",
                "properties": {
                    "bike_model": {"type": "string"},
                    "date": {"type": "string", "description": "YYYY-MM-DD"},
                },
                "required": ["bike_model", "date"],
            },
        },
    },
]

ORDER_TRAIN = [
    "Where is my order {id}?",
    "Hi, can you check order {id} for me?",
    "my order number is {id}, has it shipped yet",
    "What's the status of {id}?",
    "I ordered a helmet last week, order {id}. When will it arrive?",
    "Could you track {id} please",
    "Has {id} been dispatched?",
    "Order {id} still hasn't arrived, what's going on?",
]
ORDER_TEST = [
    "Any news on my package {id}?",
    "Can you tell me where {id} is right now?",
    "I'm waiting for {id}, is it on its way?",
]
SERVICE_TRAIN = [
    "I'd like to book a service for my {bike} on {date}.",
    "Can I bring my {bike} in for a tune-up on {date}?",
    "Please schedule a workshop appointment for a {bike}, {date} works for me.",
    "my {bike} needs a check, is {date} possible?",
    "Book my {bike} in for servicing on {date} please",
    "Could the workshop look at my {bike} on {date}?",
]
SERVICE_TEST = [
    "I want the {bike} serviced, ideally on {date}.",
    "Is there a slot on {date} to service a {bike}?",
    "Put my {bike} down for a service, {date}.",
]
BIKES = ["Trailblazer 29", "City Glide", "Volt E-200", "Ridgeback Pro", "Comet Kids 20", "Volt E-300", "Urban Fold"]
TEST_BIKES = ["Gravel King", "Volt Cargo", "Metro 7"]
PLAIN = [
    ("What are your opening hours?", "Our support team is here Monday to Saturday, 9:00 to 18:00 CET."),
    ("How long do I have to return something?", "You have 30 days from delivery to return an item in its original condition."),
    ("Do you ship to Norway?", "Yes, we ship across Europe, Norway included; delivery takes 4 to 7 working days."),
    ("Which frame size fits someone 180 cm tall?", "At 180 cm most riders fit a size L frame; the size guide on each bike's page has the details."),
    ("Is the warranty on e-bike batteries two years?", "Yes: e-bike batteries have a 2-year warranty, frames 5 years."),
    ("Can I pay in instalments?", "Yes, at checkout you can split payments over 3, 6 or 12 months."),
    ("Do you sell gift cards?", "Yes, gift cards from 25 to 500 EUR, sent by email."),
    ("How do I reset my password?", "Use 'Forgot password' on the sign-in page and follow the email we send you."),
]
PLAIN_TEST = [
    ("Are you open on Sundays?", None),
    ("What's the warranty on a frame?", None),
    ("Can I return a bike I've ridden once?", None),
]


def order_id(rng: random.Random) -> str:
    return f"NW-{rng.randint(10000, 99999)}"


def date(rng: random.Random) -> str:
    return f"2027-{rng.randint(1, 12):02d}-{rng.randint(1, 28):02d}"


def call(name: str, arguments: dict[str, str], i: int) -> dict:
    return {"id": f"call_{i}", "type": "function", "function": {"name": name, "arguments": json.dumps(arguments)}}


def chat(rng: random.Random, i: int) -> dict:
    kind = rng.choice(["order", "order", "service", "service", "plain"])
    messages = [{"role": "system", "content": SYSTEM}]
    if kind == "plain":
        question, answer = rng.choice(PLAIN)
        messages += [{"role": "user", "content": question}, {"role": "assistant", "content": answer}]
        return {"messages": messages, "tools": TOOLS, "parallel_tool_calls": False}
    if kind == "order":
        ident = order_id(rng)
        messages.append({"role": "user", "content": rng.choice(ORDER_TRAIN).format(id=ident)})
        the_call = call("get_order_status", {"order_id": ident}, i)
        status = rng.choice(["shipped, arriving Thursday", "packed, leaving the warehouse today", "delivered yesterday"])
        result = json.dumps({"order_id": ident, "status": status})
        answer = f"Order {ident} is {status}."
    else:
        bike, when = rng.choice(BIKES), date(rng)
        messages.append({"role": "user", "content": rng.choice(SERVICE_TRAIN).format(bike=bike, date=when)})
        the_call = call("book_service", {"bike_model": bike, "date": when}, i)
        result = json.dumps({"booked": True, "date": when, "time": "10:00"})
        answer = f"Done: your {bike} is booked in for {when} at 10:00."
    messages.append({"role": "assistant", "content": None, "tool_calls": [the_call]})
    if rng.random() < 0.5:
        messages.append({"role": "tool", "tool_call_id": the_call["id"], "content": result})
        messages.append({"role": "assistant", "content": answer})
    return {"messages": messages, "tools": TOOLS, "parallel_tool_calls": False}


def test_request(rng: random.Random) -> dict:
    kind = rng.choice(["order", "order", "service", "service", "plain"])
    messages = [{"role": "system", "content": SYSTEM}]
    if kind == "plain":
        question, _ = rng.choice(PLAIN_TEST)
        messages.append({"role": "user", "content": question})
        return {"messages": messages, "tools": TOOLS, "expected": None}
    if kind == "order":
        ident = order_id(rng)
        messages.append({"role": "user", "content": rng.choice(ORDER_TEST).format(id=ident)})
        return {"messages": messages, "tools": TOOLS,
                "expected": {"name": "get_order_status", "arguments": {"order_id": ident}}}  # fmt: skip
    bike, when = rng.choice(TEST_BIKES), date(rng)
    messages.append({"role": "user", "content": rng.choice(SERVICE_TEST).format(bike=bike, date=when)})
    return {"messages": messages, "tools": TOOLS,
            "expected": {"name": "book_service", "arguments": {"bike_model": bike, "date": when}}}  # fmt: skip


def write(path: Path, rows: list[dict]) -> None:
    path.write_text("".join(json.dumps(row) + "\n" for row in rows), encoding="utf-8")


def main() -> None:
    rng = random.Random(7)
    write(HERE / "train.jsonl", [chat(rng, i) for i in range(240)])
    write(HERE / "valid.jsonl", [chat(rng, i) for i in range(30)])
    write(HERE / "test.jsonl", [test_request(rng) for _ in range(60)])


if __name__ == "__main__":
    main()
