// A1111 loads every javascript/*.js of an extension. The Ablate button runs through A1111's own progress machinery
// (as its Train tab does): a task id for /internal/progress, the progress bar with ETA, and the phase, loss and time
// left that the run writes into shared.state.textinfo.

function concept_ablation_start() {
    var id = randomId();
    requestProgress(id, gradioApp().getElementById('concept_ablation_status'), null, function() {}, function(progress) {
        gradioApp().getElementById('concept_ablation_progress').innerHTML = progress.textinfo || '';
    });

    var res = Array.from(arguments);
    res[0] = id;
    return res;
}
