"""Small built-in word lists for keys and word values (no downloads)."""

# fmt: off
ADJECTIVES = (
    "able", "acid", "agile", "alert", "amber", "ample", "angry", "antique", "arctic", "ashen", "awake",
    "bald", "bitter", "blank", "bold", "brave", "brief", "bright", "brisk", "broad", "busy", "calm",
    "candid", "clever", "cloudy", "coastal", "cold", "cosmic", "crisp", "curly", "damp", "daring",
    "deep", "dense", "dizzy", "dry", "dusty", "eager", "early", "easy", "elder", "empty", "even",
    "faint", "fancy", "fierce", "flat", "fluffy", "fond", "fresh", "frozen", "gentle", "giant",
    "glad", "golden", "grand", "green", "grumpy", "happy", "hardy", "hasty", "heavy", "hidden",
    "hollow", "humble", "hungry", "icy", "idle", "jolly", "keen", "kind", "lame", "large", "lazy",
    "little", "lively", "lone", "loud", "lucky", "mellow", "merry", "mighty", "misty", "modest",
    "muddy", "narrow", "neat", "nimble", "noble", "odd", "olive", "pale", "plain", "polite", "proud",
    "purple", "quick", "quiet", "rapid", "rare", "rough", "round", "royal", "rusty", "sandy", "shaky",
    "sharp", "shiny", "silent", "silver", "sleepy", "slow", "smooth", "snowy", "solid", "sour",
    "spicy", "steady", "stormy", "sunny", "sweet", "swift", "tall", "tame", "tidy", "tiny", "vast",
)

NOUNS = (
    "acorn", "anchor", "apple", "arrow", "badger", "banjo", "barrel", "beacon", "beaver", "bell",
    "bison", "blossom", "boat", "boulder", "bridge", "brook", "bucket", "cactus", "camel", "candle",
    "canyon", "carrot", "castle", "cedar", "cherry", "chisel", "cloud", "clover", "comet", "copper",
    "coral", "cotton", "crane", "cricket", "crown", "daisy", "desert", "dolphin", "dragon", "drum",
    "eagle", "ember", "falcon", "feather", "fern", "fiddle", "forest", "fossil", "fox", "garden",
    "glacier", "goose", "granite", "harbor", "hammer", "hazel", "heron", "island", "ivory", "jacket",
    "jaguar", "kettle", "kite", "ladder", "lantern", "lemon", "lizard", "lotus", "magnet", "maple",
    "marble", "meadow", "mirror", "moose", "needle", "nutmeg", "oasis", "otter", "owl", "paddle",
    "panda", "parrot", "pebble", "pepper", "piano", "pigeon", "pillow", "pine", "planet", "pond",
    "pumpkin", "quartz", "rabbit", "raven", "ribbon", "river", "rocket", "saddle", "salmon", "satchel",
    "shell", "spider", "spoon", "squirrel", "starling", "stone", "sparrow", "thistle", "thunder",
    "tiger", "timber", "tulip", "turtle", "valley", "violin", "walnut", "whale", "willow", "window",
    "wizard", "wolf", "yarrow", "zebra",
)
# fmt: on
