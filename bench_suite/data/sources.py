"""Where every raw file the loaders read comes from: a pinned revision and the checksums that file must have.

Most PEFT-U corpora are fetched from the PEFT-U authors' own repository at one pinned commit (the exact
bytes their scripts read), checked against the git blob id that commit's tree records for the file (and
SHA-256 where it was measured, see shared SOURCES.md). The LeWiDi files come from Ni-Vi/lewidi_2023 at a
pinned commit with SHA-256 each. Measuring Hate Speech is a Hugging Face dataset: fetched with
huggingface_hub and checked against the hub's own SHA-256 of the file (its revision is recorded in the data
root's fetch.lock.json, since no commit was pinned here). Upstream releases and licences: corpora.RELEASE.
"""
from __future__ import annotations

from dataclasses import dataclass

PEFTU = ("ChrisIsKing/Parameter-Efficient-Personalization", "555d7add8c32511ba5e62e4afdc702ecd6df5467")
LEWIDI = ("Ni-Vi/lewidi_2023", "335e75278b2283693e256b2ba020063c74d7d85b")


@dataclass(frozen=True)
class Source:
    dest: str                       # path under the data root, as the loaders read it
    tasks: tuple[str, ...]
    github: tuple[str, str, str] | None = None   # (owner/repo, commit, path)
    hf: tuple[str, str, str] | None = None       # (dataset repo id, file name, revision)
    git_blob: str | None = None     # SHA-1 git blob id from the pinned commit's tree
    sha256: str | None = None
    manual: str | None = None       # why it cannot be downloaded, and how to get it by hand

    @property
    def where(self) -> str:
        if self.github:
            return f"github.com/{self.github[0]} @ {self.github[1][:10]} {self.github[2]}"
        if self.hf:
            return f"huggingface.co/datasets/{self.hf[0]} {self.hf[1]} ({self.hf[2]})"
        return "by hand"


def _p(dest, tasks, path, blob, sha256=None):
    return Source(f"peftu/raw/{dest}", tasks, github=(*PEFTU, f"data/{path}"), git_blob=blob, sha256=sha256)


SD = ("subjectivediscourse_response", "subjectivediscourse_question_sentiment", "subjectivediscourse_response_sentiment")
SOURCES = [
    _p("hatexplain/dataset.json", ("hatexplain",), "hatexplain/dataset.json", "741bc082c38f4f8ee45cebdc868b3768e3901089"),
    _p("gabhate/GabHateCorpus_annotations.tsv", ("gabhate",), "gabhate/GabHateCorpus_annotations.tsv",
       "f8b77e3462837e0b9d89799086bc60832a481289"),
    _p("tweeteval/annotations_g3.csv", ("tweeteval",), "tweeteval/annotations_g3.csv",
       "d6e9e3210d2c774a1a550e2b6629fbe61fbcac87", "9e2a8578adb1446154aef2f5ea7c60702a97992369faa48aa06dd8b8045e7915"),
    _p("unhealthyconversations/unhealthy_full.csv", ("unhealthyconversations",),
       "unhealthyconversations/unhealthy_full.csv", "983a803d4a4d87d84c35199a6257ff559b0159c5"),
    _p("wikidetox/aggression_annotations.tsv", ("wikidetox",), "wikidetox/aggression_annotations.tsv",
       "60b5a82479e4a42d2ea71f7935e5848e0890e416"),
    _p("wikidetox/aggression_annotated_comments.tsv", ("wikidetox",), "wikidetox/aggression_annotated_comments.tsv",
       "91a33cfaa4184db0c968b2472ad24b5d8dff1d26"),
    *[_p(f"goemotion/goemotions_{i}.csv", ("goemotion",), f"goemotion/goemotions_{i}.csv", b)
      for i, b in ((1, "9d2a090e3ff0a626c2ca6e572f07b0c4614bee71"), (2, "4aa09a16a323b49bacefbf785faaca5b7e8f5d3d"),
                   (3, "3c42521b338a07407806b0d2659e674ac762d76d"))],
    _p("goemotion/ekman_mapping.json", ("goemotion",), "goemotion/ekman_mapping.json",
       "dd13b0702f20993f0f4aed84fc87a124c7a783ba", "d6b1fea382917c1685c42e1324a0344106be9390f52a3850ce032656d103a328"),
    _p("studemo/annotation_data.csv", ("studemo",), "studemo/annotation_data.csv",
       "f1e96b4128691fe76c8eaa202fa4a4ff981be99c", "41ea03cdb09839c1c3f643a02fb3419abbcea71d5b49fefcbe19d663ec52a828"),
    _p("studemo/text_data.csv", ("studemo",), "studemo/text_data.csv",
       "c745ccb22375fd0260247e13fdca03ef9b89b33d", "1edd45a0b43c94a44519d85948310c163a541f4e661736143e9fb31c173369e1"),
    _p("subjectivediscourse/gold_full_data.tar.gz", SD, "subjectivediscourse/gold_full_data.tar.gz",
       "e2c279e02f98fdc7afca15907ed59b6021cbf073", "5533179c5129fed368595011bd5785bca55f97f6e9aa3a7da03d692b22aa0ae2"),
    _p("cockamamie/cockamamie.json", ("cockamamie",), "cockamamie/cockamamie.json",
       "9386446c3274b3242f130f5ae4f53ef4efa199db"),
    _p("epic/EPICorpus.csv", ("epic",), "epic/EPICorpus.csv", "619a7b9e8e5c300c40281f6f4087115eeb981215"),
    Source("peftu/raw/measuringhatespeech/measuring-hate-speech.parquet", ("measuringhatespeech",),
           hf=("ucberkeley-dlab/measuring-hate-speech", "measuring-hate-speech.parquet", "main")),
]
_LEWIDI = {  # dataset -> task, sha256 of (dev, test, train) as stored upstream
    "ArMIS": ("armis", ("0a19d297cc8134e0fe139bd961d70ec6830df0dec1901138cdebe1cb851459d5",
                        "82f2822dd40d7ce95ada6804a814b4382b553026eeab50ebe574124734f38cd6",
                        "558d0a619259699c44b7c9fb8b27e98e7c94cc35ff5ac8214101e9d4226365a1")),
    "ConvAbuse": ("convabuse", ("2f4b02049790638a3a4309466e4967431e9724a1517083bb91ae0c7b850f97bb",
                                "2c1f93ded80a49fdd55955a7d7a77cd53193fe5db770b89be7487f599b665920",
                                "5088e8b1c50823deecbda9195e160f8a3d50532daaeebddb7ab7cafcdb418941")),
    "HS-Brexit": ("hs_brexit", ("5061ccc985b9eda9d0a32e64ca0043bff7966b326752f41657a2fd479814eefb",
                                "ba19431f704e0095e9e7b9c966e978cfc44070427c080329e2f0d1b611a1c005",
                                "74a11dfd990143f3d24f467e3eac551a4f7a3a15a3f34ff9902f54c37165b8cf")),
    "MD-Agreement": ("md_agreement", ("4827d7c7df1605e604472594de7e4e01d08a9da6e850634e8e9de9fcd8f4a2c1",
                                      "b68a15225278db22ad514878feff3e0f79287a23ecfc55dda8678cb5a7f24a24",
                                      "bada36e99012eb4da353a5bcacab44be862104430ee6f86b19bddd6f287f9484")),
}
SOURCES += [Source(f"lewidi/raw/{ds}/{ds}_{sp}.json", (task,),
                   github=(*LEWIDI, f"storage/data/raw/{ds}/{ds}_{sp}.json"), sha256=sha)
            for ds, (task, shas) in _LEWIDI.items() for sp, sha in zip(("dev", "test", "train"), shas)]
