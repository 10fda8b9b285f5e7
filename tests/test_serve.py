"""The web demo (revision.serve) on checkpoints of the mini world: a real server on 127.0.0.1, driven through
gradio_client and through headless Chromium (Debian's chromium + chromedriver, which .ci/run installs)."""
import json
import os
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest
from PIL import Image

from revision.infer import Predictor
from revision.predict import main as predict_cli
from revision.serve import find_examples, main as serve_cli

gradio_client = pytest.importorskip("gradio_client")
REPO = Path(__file__).resolve().parents[1]
CAP = 1_000_000  # the server's --max_pixels here: a 1001x1000 upload is over it


@pytest.fixture(scope="module")
def checkpoint(mini_demo) -> Path:
    return mini_demo / "seed-0" / "runs" / "no_stage1" / "stage2"  # a chat-template checkpoint: multi-turn applies


@pytest.fixture(scope="module")
def examples(checkpoint, tmp_path_factory) -> list[tuple[Path, str, str]]:
    """The world's held-out (image, question) pairs the page offers as examples, each with revision.predict's
    answer (its CLI on the world's question file)."""
    world, answers = checkpoint.parents[2] / "world", tmp_path_factory.mktemp("predict") / "answers.jsonl"
    assert predict_cli(["--model", str(checkpoint), "--questions", str(world / "eval_questions.jsonl"),
                        "--answers", str(answers)]) == 0
    rows = [json.loads(line) for line in answers.read_text().splitlines()]
    found = find_examples(checkpoint, None, len(rows))
    assert [question for _, question in found] == [row["prompt"] for row in rows]
    return [(image, question, row["text"]) for (image, question), row in zip(found, rows)]


@pytest.fixture(scope="module")
def server(checkpoint, tmp_path_factory):
    """`python -m revision.serve` on the checkpoint (127.0.0.1, the first free port from 7860); stopped after the
    module. Yields (url, seconds from the start until it listened)."""
    log = tmp_path_factory.mktemp("serve") / "serve.log"  # uploads go next to it (GRADIO_TEMP_DIR)
    start = time.perf_counter()
    with open(log, "w") as out:
        proc = subprocess.Popen([sys.executable, "-m", "revision.serve", "--model", str(checkpoint), "--max_pixels", str(CAP)],
                                cwd=REPO, stdout=out, stderr=subprocess.STDOUT,
                                env={**os.environ, "OMP_NUM_THREADS": "1", "GRADIO_ANALYTICS_ENABLED": "False",
                                     "GRADIO_TEMP_DIR": str(log.parent / "uploads")})
    try:
        while "ReVision demo of" not in log.read_text():
            assert proc.poll() is None, f"the server stopped (exit {proc.returncode}):\n{log.read_text()}"
            assert time.perf_counter() - start < 120, f"the server did not listen within 120 s:\n{log.read_text()}"
            time.sleep(0.1)
        url = re.search(r" on (http://\S+)", log.read_text()).group(1)
        assert url.startswith("http://127.0.0.1:")  # never another address by default
        yield url, time.perf_counter() - start
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=15)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


def answered(examples: list[tuple[Path, str, str]]) -> list[tuple[Path, str, str]]:
    """The examples whose answer shows: a mini-world model answers many questions with nothing."""
    shown = [e for e in examples if e[2]]
    assert shown, "the mini-world checkpoint answered every held-out question with nothing"
    return shown


def text_of(message: dict) -> str:
    content = message["content"]
    return content if isinstance(content, str) else "".join(part["text"] for part in content)


def test_answers_match_predict_and_bad_input_gets_a_message(server, checkpoint, examples, tmp_path, capsys):
    url, listening = server
    client = gradio_client.Client(url, verbose=False)
    image, question, expected = answered(examples)[0]
    start = time.perf_counter()
    history, box, status = client.predict(gradio_client.handle_file(str(image)), question, [], 128, 0.0, api_name="/ask")
    with capsys.disabled():
        print(f"\ngradio_client: the server listened {listening:.1f} s after its start; "
              f"first answer {time.perf_counter() - start:.2f} s later")
    assert [m["role"] for m in history] == ["user", "assistant"] and text_of(history[0]) == question
    assert text_of(history[1]) == expected and box == "" and status.startswith("Answered in")
    assert predict_cli(["--model", str(checkpoint), "--image", str(image), "--prompt", question]) == 0
    assert capsys.readouterr().out == expected + "\n"  # one question on the command line: the same answer

    # a second turn on the same image: the conversation so far, in the checkpoint's template
    follow_up = next(q for i, q, _ in examples if i == image and q != question)
    history2, _, _ = client.predict(gradio_client.handle_file(str(image)), follow_up, history, 128, 0.0, api_name="/ask")
    conversation = [{"from": "human", "value": question}, {"from": "gpt", "value": expected},
                    {"from": "human", "value": follow_up}]
    assert len(history2) == 4
    assert text_of(history2[3]) == Predictor(checkpoint, device="cpu").answer(conversation, str(image))

    # two users at once: the queue answers each about its own image, in its own conversation
    pair = [answered(examples)[0], next(e for e in answered(examples) + examples if e[0] != image)]
    jobs = [gradio_client.Client(url, verbose=False).submit(gradio_client.handle_file(str(e[0])), e[1], [], 128, 0.0,
                                                             api_name="/ask") for e in pair]
    for job, (_, asked, answer) in zip(jobs, pair):
        got = job.result(timeout=60)[0]
        assert [text_of(m) for m in got] == [asked, answer]

    # bad input: a message in the page, never a traceback
    (tmp_path / "notes.txt").write_text("not an image")
    Image.new("RGB", (1001, 1000)).save(tmp_path / "huge.png")
    for upload, asked, message in [
        (tmp_path / "notes.txt", question, "notes.txt is not an image this demo can read"),
        (tmp_path / "huge.png", question, "huge.png: 1001x1000 = 1 MP is over the 1 MP pixel cap"),
        (image, "   ", "Type a question about the image first"),
    ]:
        history, box, status = client.predict(gradio_client.handle_file(str(upload)), asked, [], 128, 0.0, api_name="/ask")
        assert history == [] and status.startswith("⚠️") and message in status


def test_a_checkpoint_that_cannot_load_refuses_to_start(tmp_path, capsys):
    assert serve_cli(["--model", str(tmp_path)]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "revision_config.json is missing" in err


def test_examples_come_from_the_world_the_checkpoint_was_trained_on(checkpoint, tmp_path):
    world = checkpoint.parents[2] / "world"
    first = json.loads((world / "eval_questions.jsonl").read_text().splitlines()[0])
    assert find_examples(checkpoint, None, 6)[0] == (world / first["image"], first["text"])
    assert len(find_examples(checkpoint, None, 6)) == 6
    assert find_examples(tmp_path, None, 6) == []  # a checkpoint from elsewhere: no examples


@pytest.fixture
def browser():
    chromium, driver = shutil.which("chromium"), shutil.which("chromedriver")
    if not (chromium and driver):
        pytest.skip("needs Debian's chromium and chromium-driver (apt-get install chromium chromium-driver; .ci/run does)")
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    options = webdriver.ChromeOptions()
    options.binary_location = chromium
    for flag in ("--headless=new", "--no-sandbox", "--disable-dev-shm-usage", "--window-size=1280,1100"):
        options.add_argument(flag)
    chrome = webdriver.Chrome(service=Service(driver), options=options)
    try:
        yield chrome
    finally:
        chrome.quit()


def test_the_page_in_a_real_browser(server, examples, browser, tmp_path, capsys):
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import WebDriverWait

    url, _ = server
    image, question, answer = answered(examples)[0]
    start = time.perf_counter()
    browser.get(url)
    wait = WebDriverWait(browser, 60)
    upload = wait.until(lambda b: b.find_element(By.CSS_SELECTOR, "#image input[type=file]"))
    header = browser.find_element(By.ID, "checkpoint").text
    assert "no_stage1" in header and "Alignment: none" in header and "Encoder" in header and "LLM" in header
    settings = [browser.find_element(By.CSS_SELECTOR, f"#{name} input[type=number]").get_attribute("value")
                for name in ("max_new_tokens", "temperature")]
    assert settings == ["128", "0"]  # revision.predict's defaults
    assert image.name in browser.page_source  # the held-out examples are offered
    upload.send_keys(str(image))
    wait.until(lambda b: b.find_elements(By.CSS_SELECTOR, "#image img"))
    browser.find_element(By.CSS_SELECTOR, "#question textarea").send_keys(question)
    browser.find_element(By.ID, "ask").click()
    wait.until(lambda b: "Answered in" in b.find_element(By.ID, "status").text)
    with capsys.disabled():
        print(f"\nchromium: page asked for, image uploaded, question typed, answer shown: {time.perf_counter() - start:.2f} s")
    bubbles = [b.text for b in browser.find_elements(By.CSS_SELECTOR, "#chat [data-testid=bot]")]
    assert bubbles and bubbles[-1].strip() == answer
    assert browser.save_screenshot(str(tmp_path / "page.png")) and Image.open(tmp_path / "page.png").width == 1280
