# Sourced by the long-run scripts (RUNS and PYTHON set): `train FAMILY NAME OPTIONS...` skips a finished run
# (its metrics.json), resumes an interrupted one (its config.json holds the recipe, data and split), and else
# starts it with OPTIONS.
train() {
    local family=$1 name=$2; shift 2
    if [[ -f $RUNS/$name/metrics.json ]]; then echo "done: $name"; return; fi
    local how=("$@")
    if [[ -f $RUNS/$name/config.json ]]; then how=(--resume); fi
    echo "\$ train.py $family --name $name ${how[*]}"
    $PYTHON train.py "$family" --runs "$RUNS" --name "$name" "${how[@]}"
}
