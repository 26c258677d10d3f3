"""Generate hh_tiny: a small preference dataset in the raw Anthropic-HH format, written for this project.

    python examples/data/make_hh_data.py --out examples/data/hh_tiny --train 2000 --test 200 --seed 0

Each JSONL row is ``{"chosen": transcript, "rejected": transcript}`` with transcripts
``"\\n\\nHuman: ...\\n\\nAssistant: ..."``. Both share everything up to the last ``"\\n\\nAssistant:"``
(earlier turns of multi-turn rows included) and differ only in the final reply. As in Anthropic HH, both
replies come from one assistant and the better one is marked chosen: each reply is drawn from
``REPLY_MIX`` (a helpful, on-topic answer from a small knowledge base, a polite but vague reply, a
helpful answer about another topic, an evasive or a rude reply) and ``rule_score`` picks the chosen one, so a chosen reply is not
always a good one (two poor replies make a poor chosen one). The examples import this file by path
(``examples/`` is not a package) to reuse ``rule_score`` and ``TOPICS`` as a rule judge.

Standard library only; the same arguments give byte-identical files.
"""

from __future__ import annotations

import argparse
import json
import random
import re
from pathlib import Path

# topic -> question templates that fit its items, (item, concrete answer, short answer) triples, and tips.
TOPICS: dict[str, dict[str, tuple]] = {
    "cooking": {
        "questions": (
            "How do I make {item}?",
            "What's the best way to cook {item}?",
            "Any cooking tips for {item}?",
        ),
        "items": (
            (
                "rice",
                "Rinse the rice, then simmer one cup of rice in two cups of salted water, covered, for about 18 minutes.",
                "Simmer one cup of rice in two cups of water for 18 minutes.",
            ),
            (
                "pancakes",
                "Whisk flour, milk, an egg and baking powder into a thick batter and fry the pancakes on a buttered pan until bubbles form, then flip.",
                "Fry a thick pancake batter on a buttered pan and flip when bubbles form.",
            ),
            (
                "scrambled eggs",
                "Beat the eggs with a pinch of salt and stir them slowly in butter over low heat, taking the pan off the stove while they are still soft.",
                "Stir the eggs slowly in butter over low heat.",
            ),
            (
                "pasta",
                "Boil the pasta in plenty of salted water, taste it a minute before the packet time, and save a cup of the starchy water for the sauce.",
                "Boil the pasta in plenty of salted water.",
            ),
            (
                "a steak",
                "Dry the steak, salt it well, sear it in a very hot skillet for three minutes per side, then let the meat rest for five minutes.",
                "Sear the steak in a very hot skillet, then rest the meat.",
            ),
            (
                "roast chicken",
                "Season the chicken inside and out, roast it at 200 C for about an hour, and check that the thigh juices run clear.",
                "Roast the chicken at 200 C for about an hour.",
            ),
            (
                "lentil soup",
                "Fry onion, carrot and garlic, add rinsed lentils, stock and cumin, and simmer the soup for 25 minutes until the lentils are tender.",
                "Simmer lentils with onion, stock and cumin for 25 minutes.",
            ),
            (
                "homemade bread",
                "Knead flour, water, yeast and salt into a smooth dough, let it rise until doubled, shape the loaf and bake it at 230 C.",
                "Knead the dough, let it rise, and bake the loaf at 230 C.",
            ),
        ),
        "tips": (
            "Taste the dish as you go and adjust the seasoning at the end.",
            "A heavy pan and a sharp knife make kitchen work much easier.",
            "Read the whole recipe before you start so the ingredients are ready.",
        ),
    },
    "travel": {
        "questions": (
            "How should I handle {item} when I travel?",
            "Any travel advice about {item}?",
            "What do frequent travelers do about {item}?",
        ),
        "items": (
            (
                "jet lag",
                "Shift your sleep an hour a day before the flight, drink water on the plane, and get outdoor daylight on arrival to reset your body clock.",
                "Get outdoor daylight on arrival to reset your body clock.",
            ),
            (
                "a lost passport",
                "Report the lost passport to local police, then contact your embassy or consulate, which can issue an emergency travel document.",
                "Report the lost passport to police and contact your embassy.",
            ),
            (
                "packing light",
                "Pack for one week no matter the trip length, choose clothes in two colors that mix, and wear your bulkiest shoes on the flight.",
                "Pack a week of clothes that mix and match in a carry-on bag.",
            ),
            (
                "cheap flights",
                "Compare fares in a flight search tool with flexible dates, book about two months ahead, and check smaller nearby airports.",
                "Book flights about two months ahead with flexible dates.",
            ),
            (
                "motion sickness",
                "Sit over the wing on a plane or at the front of a bus, look at the horizon, and take ginger or an antihistamine before departure.",
                "Sit over the wing and take ginger before departure.",
            ),
            (
                "currency exchange",
                "Avoid airport exchange booths, withdraw local currency from a bank ATM, and always choose to pay in the local currency.",
                "Withdraw local currency from a bank ATM, not an airport booth.",
            ),
            (
                "travel insurance",
                "Buy travel insurance when you book so cancellation is covered, and check the medical limit and the luggage cover.",
                "Buy travel insurance when you book the trip.",
            ),
            (
                "long layovers",
                "On a long layover, check whether you can leave the airport, store your luggage, and look for a lounge day pass or airport hotel.",
                "Store your luggage and check whether you can leave the airport.",
            ),
        ),
        "tips": (
            "Keep digital copies of your passport and bookings in your email.",
            "Tell your bank about your trip so your card is not blocked abroad.",
            "Arrive at the airport two hours early for international flights.",
        ),
    },
    "gardening": {
        "questions": (
            "How do I grow {item}?",
            "What's the secret to growing {item} in a garden?",
            "Any gardening tips for {item}?",
        ),
        "items": (
            (
                "tomatoes",
                "Plant tomatoes in full sun after the last frost, water the soil deeply twice a week, and tie the stems to a stake as they grow.",
                "Plant tomatoes in full sun and stake the stems.",
            ),
            (
                "basil",
                "Sow basil in warm soil in a sunny spot, keep it moist, and pinch off the flower buds so the plant keeps making leaves.",
                "Grow basil in sun and pinch off the flower buds.",
            ),
            (
                "roses",
                "Plant roses where they get six hours of sun, mulch the roots, and prune the canes in late winter just above an outward bud.",
                "Give roses six hours of sun and prune the canes in late winter.",
            ),
            (
                "potatoes",
                "Plant seed potatoes in trenches, pile soil over the shoots as they grow, and dig the tubers up after the foliage dies back.",
                "Plant seed potatoes in trenches and pile soil over the shoots.",
            ),
            (
                "strawberries",
                "Set strawberry plants in rich soil with the crown at soil level, mulch with straw, and pick the berries as soon as they turn red.",
                "Mulch strawberry plants with straw and pick the red berries.",
            ),
            (
                "a lawn",
                "Sow grass seed on raked soil in early autumn, keep it damp until it sprouts, and mow the lawn high so the roots grow deep.",
                "Sow grass seed in early autumn and mow the lawn high.",
            ),
            (
                "orchids",
                "Give orchids bright indirect light, water them once a week by soaking the bark, and let the pot drain completely.",
                "Water orchids weekly by soaking the bark.",
            ),
            (
                "carrots",
                "Sow carrot seeds thinly in loose, stone-free soil, keep the bed moist, and thin the seedlings to five centimeters apart.",
                "Sow carrot seeds in loose, stone-free soil.",
            ),
        ),
        "tips": (
            "Add compost to the soil every spring to feed the plants.",
            "Water in the morning so leaves dry before evening and mildew stays away.",
            "Check the seed packet for spacing and the sowing month.",
        ),
    },
    "pets": {
        "questions": (
            "How should I care for {item}?",
            "What does {item} need to stay healthy?",
            "Any pet care advice for {item}?",
        ),
        "items": (
            (
                "a new puppy",
                "Feed the puppy three small meals a day, take it outside after every meal and nap for house training, and book its vaccinations with a vet.",
                "Feed the puppy three small meals a day and book its vaccinations.",
            ),
            (
                "an older cat",
                "Give an older cat soft food, a warm bed and an easy litter box, and take the cat to the vet for a checkup twice a year.",
                "Give an older cat soft food and a vet checkup twice a year.",
            ),
            (
                "a goldfish",
                "Keep a goldfish in a filtered tank of at least 75 liters, change a quarter of the water weekly, and feed it only a pinch of flakes.",
                "Keep a goldfish in a large filtered tank.",
            ),
            (
                "a rabbit",
                "A rabbit needs unlimited hay, fresh greens, a large pen to hop in, and the company of another rabbit if possible.",
                "A rabbit needs unlimited hay and room to hop.",
            ),
            (
                "a parrot",
                "Give a parrot a big cage, toys to chew, fresh fruit and pellets instead of only seeds, and several hours out of the cage each day.",
                "Give a parrot a big cage, chew toys and fresh fruit.",
            ),
            (
                "a hamster",
                "Give a hamster deep bedding to burrow in, a solid exercise wheel, and clean its cage once a week without moving everything.",
                "Give a hamster deep bedding and an exercise wheel.",
            ),
            (
                "a rescue dog",
                "Give a rescue dog a quiet space, a fixed routine for walks and meals, and reward calm behavior with treats while it settles in.",
                "Give a rescue dog a quiet space and a fixed routine.",
            ),
            (
                "a kitten",
                "Feed a kitten kitten food four times a day, show it the litter tray after meals, and play with it daily using wand toys.",
                "Feed a kitten kitten food four times a day and give it a litter tray.",
            ),
        ),
        "tips": (
            "Microchip your pet and keep the vet's number on the fridge.",
            "Fresh water should always be available in a clean bowl.",
            "Ask your vet about flea and worm treatment for your animal.",
        ),
    },
    "fitness": {
        "questions": (
            "How do I get better at {item}?",
            "What's a good workout plan for {item}?",
            "Any fitness tips for {item}?",
        ),
        "items": (
            (
                "running a 5k",
                "Run three times a week, alternating jogging and walking at first, and add a little distance each week until you can run 5 kilometers.",
                "Run three times a week, mixing jogging and walking.",
            ),
            (
                "push-ups",
                "Do three sets of push-ups every other day, starting on your knees or against a wall, and add one repetition per set each session.",
                "Do three sets of push-ups every other day.",
            ),
            (
                "building core strength",
                "Hold a plank for 30 seconds, add dead bugs and side planks, and train your core muscles three times a week.",
                "Hold a plank and train your core three times a week.",
            ),
            (
                "stretching",
                "Stretch after your workout when muscles are warm, hold each stretch for 30 seconds, and never bounce into the stretch.",
                "Stretch warm muscles and hold each stretch for 30 seconds.",
            ),
            (
                "squats",
                "Keep your feet shoulder width apart, push your hips back, keep your chest up, and lower until your thighs are parallel to the floor.",
                "Push your hips back and keep your chest up on squats.",
            ),
            (
                "losing belly fat",
                "Combine strength training three times a week with daily walking, eat more protein, and keep a small calorie deficit.",
                "Combine strength training, daily walking and more protein.",
            ),
            (
                "swimming laps",
                "Practice breathing every three strokes, use a kickboard for leg drills, and swim short intervals with rest between laps.",
                "Breathe every three strokes and swim short intervals.",
            ),
            (
                "a pull-up",
                "Start with dead hangs and slow negatives from the top of the bar, and train your back with rows until you can do a full pull-up.",
                "Do dead hangs and slow negatives from the bar.",
            ),
        ),
        "tips": (
            "Warm up with light cardio for five minutes before every workout.",
            "Rest days let your muscles recover, so schedule them.",
            "Track your workouts to see progress week by week.",
        ),
    },
    "programming": {
        "questions": (
            "How do I handle {item} in Python?",
            "What's the right way to deal with {item} when coding?",
            "Any programming tips about {item}?",
        ),
        "items": (
            (
                "reading a file",
                "Use a with statement: with open(path) as f: text = f.read(). The file is closed automatically even if an exception occurs.",
                "Use with open(path) as f: text = f.read().",
            ),
            (
                "sorting a list",
                "Call sorted(items) for a new sorted list, or items.sort() to sort in place; pass key=len or reverse=True to change the order.",
                "Call sorted(items) or items.sort().",
            ),
            (
                "exceptions",
                "Wrap only the risky code in try and catch the specific exception, like except ValueError, instead of a bare except.",
                "Catch the specific exception, like except ValueError.",
            ),
            (
                "a slow loop",
                "Profile the loop first, then move work out of it, use a dict or set for lookups, or vectorize the computation with numpy.",
                "Profile the loop first, then vectorize it with numpy.",
            ),
            (
                "merge conflicts",
                "Open the conflicted file, keep the right lines between the git markers, delete the markers, then git add and commit.",
                "Edit out the git markers, then git add and commit.",
            ),
            (
                "unit tests",
                "Write small test functions with pytest, one behavior per test, and run them with python -m pytest before every commit.",
                "Write small pytest functions and run python -m pytest.",
            ),
            (
                "virtual environments",
                "Create one with python -m venv .venv, activate it, and install packages with pip so each project keeps its own dependencies.",
                "Run python -m venv .venv and activate it.",
            ),
            (
                "a KeyError",
                "A KeyError means the dict has no such key; use d.get(key, default) or check with if key in d before indexing.",
                "Use d.get(key, default) to avoid a KeyError.",
            ),
        ),
        "tips": (
            "Read the full traceback; the last line names the error type.",
            "Keep functions short and give variables descriptive names.",
            "Commit working code often so you can roll back with git.",
        ),
    },
    "weather": {
        "questions": (
            "What should I know about {item}?",
            "How do I prepare for {item}?",
            "Can you explain {item} to me?",
        ),
        "items": (
            (
                "a thunderstorm",
                "Go indoors when you hear thunder, stay away from windows and tall trees, and wait 30 minutes after the last thunder before going out.",
                "Go indoors when you hear thunder and avoid tall trees.",
            ),
            (
                "a heat wave",
                "Drink water often, stay in shade or air conditioning during the afternoon, and check on elderly neighbors during the heat.",
                "Drink water and stay in shade or air conditioning.",
            ),
            (
                "fog while driving",
                "In fog, use low beam headlights and fog lights, slow down, and leave extra distance to the car ahead.",
                "Use low beam headlights in fog and slow down.",
            ),
            (
                "the humidity forecast",
                "Humidity is the amount of water vapor in the air; high humidity makes hot days feel hotter because sweat evaporates slowly.",
                "High humidity means lots of water vapor in the air.",
            ),
            (
                "a snowstorm",
                "Stock up on food and batteries before the snowstorm, keep your car fueled, and avoid travel while the snow is heavy.",
                "Stock up on food and batteries before the snowstorm.",
            ),
            (
                "the UV index",
                "The UV index measures the strength of sunburn radiation; at 3 or above wear sunscreen, sunglasses and a hat at midday.",
                "At a UV index of 3 or above, wear sunscreen.",
            ),
            (
                "a hurricane warning",
                "A hurricane warning means storm winds are expected within 36 hours: secure windows, pack an emergency kit and follow evacuation orders.",
                "Secure windows and follow evacuation orders during a hurricane warning.",
            ),
            (
                "windchill",
                "Windchill is how cold the air feels on skin when wind removes body heat; dress in layers and cover your ears and fingers.",
                "Windchill is how cold wind makes the air feel; dress in layers.",
            ),
        ),
        "tips": (
            "Check the weather forecast each morning before you leave.",
            "Weather alerts on your phone warn you about storms in your area.",
            "Temperatures can drop fast after sunset, so bring a jacket.",
        ),
    },
    "music": {
        "questions": (
            "How do I learn {item}?",
            "What's the best way to practice {item}?",
            "Any music tips for {item}?",
        ),
        "items": (
            (
                "guitar chords",
                "Start with the open chords G, C, D and E minor, practice switching between two chords for a minute, and strum slowly with a metronome.",
                "Start with the open chords G, C, D and E minor.",
            ),
            (
                "piano scales",
                "Play the C major scale hands separately with the correct fingering, then together, and raise the metronome tempo a little each day.",
                "Play the C major scale hands separately with a metronome.",
            ),
            (
                "singing in tune",
                "Sing along with a piano note and match the pitch, record your voice to hear it back, and warm up with humming and scales.",
                "Sing along with a piano note and match the pitch.",
            ),
            (
                "reading sheet music",
                "Learn the notes on the treble clef lines, E G B D F, and the spaces, F A C E, then count the rhythm of each bar aloud.",
                "Learn the treble clef lines, E G B D F.",
            ),
            (
                "the drums",
                "Learn a basic rock beat with hi-hat on eighth notes, snare on beats two and four, and bass drum on one and three, with a metronome.",
                "Learn a basic rock beat with a metronome.",
            ),
            (
                "the violin",
                "Hold the bow loosely, practice open strings for a clean tone, and use tape on the fingerboard to find the notes at first.",
                "Practice open strings with a loose bow hold.",
            ),
            (
                "writing a song",
                "Pick a chord progression like C G A minor F, hum a melody over it, and write a chorus lyric that repeats one strong line.",
                "Hum a melody over a chord progression like C G A minor F.",
            ),
            (
                "the ukulele",
                "Tune the ukulele to G C E A, learn the C, A minor, F and G chords, and strum a simple down down up pattern.",
                "Tune the ukulele to G C E A and learn four chords.",
            ),
        ),
        "tips": (
            "Short daily practice beats one long session a week for any instrument.",
            "Play along with recordings of songs you love to stay motivated.",
            "A teacher can fix bad technique before it becomes a habit.",
        ),
    },
    "photography": {
        "questions": (
            "How do I take better photos of {item}?",
            "What camera settings work for {item}?",
            "Any photography tips for {item}?",
        ),
        "items": (
            (
                "sunsets",
                "Expose for the bright sky, set a low ISO, try an aperture around f/8, and keep shooting for twenty minutes after the sun goes down.",
                "Expose for the bright sky at a low ISO.",
            ),
            (
                "portraits",
                "Use a wide aperture like f/2 to blur the background, focus on the nearest eye, and place the person in soft window light.",
                "Use a wide aperture and focus on the nearest eye.",
            ),
            (
                "the night sky",
                "Put the camera on a tripod, use the widest lens aperture, ISO 3200, and a shutter speed of about 20 seconds to capture stars.",
                "Use a tripod, ISO 3200 and a 20 second shutter for stars.",
            ),
            (
                "sports",
                "Use a fast shutter speed of at least 1/1000 second, continuous autofocus, and burst mode to freeze the action.",
                "Use a 1/1000 second shutter speed and burst mode.",
            ),
            (
                "desserts",
                "Shoot desserts from above or at 45 degrees in natural side light, and wipe the plate edges before the photo.",
                "Shoot desserts from above in natural side light.",
            ),
            (
                "landscapes",
                "Use a small aperture like f/11 for sharp depth, place the horizon on a third of the frame, and shoot in golden hour light.",
                "Use f/11 and shoot landscapes in golden hour light.",
            ),
            (
                "wildlife",
                "Use a long telephoto lens, a fast shutter speed and continuous autofocus, and stay quiet to photograph wildlife from a distance.",
                "Photograph wildlife with a telephoto lens and a fast shutter.",
            ),
            (
                "waterfalls",
                "Use a tripod and a slow shutter speed of half a second to make the water silky, with a neutral density filter in daylight.",
                "Use a tripod and a half second shutter speed.",
            ),
        ),
        "tips": (
            "Shoot in RAW so you can fix exposure when you edit.",
            "The rule of thirds grid on your camera screen helps composition.",
            "Clean the lens; a smudge softens every photo.",
        ),
    },
    "books": {
        "questions": (
            "What should I read if I like {item}?",
            "Can you recommend books about {item}?",
            "Any reading tips for {item}?",
        ),
        "items": (
            (
                "science fiction",
                "Try Dune by Frank Herbert for epic science fiction, then The Left Hand of Darkness by Ursula Le Guin, and Project Hail Mary by Andy Weir.",
                "Read Dune by Frank Herbert.",
            ),
            (
                "mystery novels",
                "Start with And Then There Were None by Agatha Christie, then The Big Sleep by Raymond Chandler for a classic detective novel.",
                "Start with And Then There Were None by Agatha Christie.",
            ),
            (
                "history",
                "Read SPQR by Mary Beard for Roman history and The Guns of August by Barbara Tuchman for the start of the First World War.",
                "Read SPQR by Mary Beard for Roman history.",
            ),
            (
                "fantasy",
                "Read The Hobbit by Tolkien, A Wizard of Earthsea by Le Guin, and the Mistborn novels by Brandon Sanderson.",
                "Read The Hobbit by Tolkien.",
            ),
            (
                "poetry",
                "Begin with an anthology like Poems That Make Grown Men Cry, then read Mary Oliver and Seamus Heaney aloud, one poem at a time.",
                "Read Mary Oliver and Seamus Heaney aloud.",
            ),
            (
                "audiobooks",
                "Borrow audiobooks free through a library app, start with a memoir read by its author like Born a Crime by Trevor Noah, and listen while you commute.",
                "Borrow audiobooks free through a library app.",
            ),
            (
                "classic literature",
                "Try Pride and Prejudice by Jane Austen, then Great Expectations by Dickens; an annotated edition explains the older language.",
                "Try Pride and Prejudice by Jane Austen.",
            ),
            (
                "books for a book club",
                "Pick novels with discussion guides, like Educated by Tara Westover or Klara and the Sun by Kazuo Ishiguro, and prepare three questions.",
                "Pick novels with discussion guides, like Educated by Tara Westover.",
            ),
        ),
        "tips": (
            "Your local library can lend ebooks and audiobooks for free.",
            "Keep a reading journal with a line about each novel you finish.",
            "Reading twenty pages a day adds up to over a dozen novels a year.",
        ),
    },
}

# Shared wording; none of these words count as topic keywords.
GENERIC_QUESTIONS = (
    "Can you give me some advice about {item}?",
    "What do you recommend for {item}?",
    "I have a question about {item}. What should I do?",
    "Could you help me with {item}?",
)
PREAMBLES = (
    "I'm a complete beginner.",
    "My friend told me it's easy but I'm not so sure.",
    "I tried once last month and it went badly.",
    "I have some free time this weekend and want to do it properly.",
    "I've searched online and I'm confused by all the different opinions.",
    "Quick question.",
    "This might be a silly question, but here goes.",
    "I want to surprise my family, so I need to get it right the first time.",
)
CLOSERS = (
    "Thanks!",
    "Please keep it short.",
    "Thanks in advance for your help.",
    "I'd appreciate a clear answer.",
)
OPENERS = ("Sure!", "Good question.", "Happy to help.", "Here's what works well:", "Of course.")

EVASIVE_REPLIES = (
    "I don't know, figure it out yourself.",
    "No idea. Look it up somewhere.",
    "I can't help with that. Ask someone else.",
    "Hmm, I don't know. There are so many opinions out there and it depends on so many things that I really can't say. Figure it out yourself.",
    "Not my problem, honestly. Look it up.",
    "Whatever works for you, I guess. I don't know.",
)
# Polite and on topic, but with nothing the asker can act on: the generic reply a weak assistant falls back on.
VAGUE_REPLIES = (
    "Good question. {Item} takes some practice, so start small and be patient with yourself.",
    "Sure! There are many ways to approach {item}, and with a little patience you will get there.",
    "Happy to help. {Item} is easier than it looks once you get started, so just give it a try.",
    "Of course. Everyone handles {item} a bit differently, so try a few things and see what suits you.",
)
RUDE_REPLIES = (
    "That's a stupid question.",
    "Ugh, {item}? Even a child knows that. Stop wasting my time.",
    "Seriously? What a dumb thing to ask. Go away.",
    "You clearly haven't tried at all. {Item} is obviously easy and asking me is pathetic.",
    "Only an idiot would need help with {item}. Leave me alone.",
    "Why would I waste my time on your {item} question? It's ridiculous.",
)

# Phrases the rule penalises (matched on lower-cased text with straight apostrophes).
EVASIVE_PHRASES = (
    "don't know",
    "figure it out",
    "no idea",
    "look it up",
    "ask someone else",
    "can't help",
    "not my problem",
    "whatever",
    "can't say",
)
RUDE_PHRASES = (
    "stupid",
    "dumb",
    "idiot",
    "pathetic",
    "go away",
    "leave me alone",
    "wasting my time",
    "waste my time",
    "ridiculous",
    "even a child",
    "obviously",
)
PHRASE_PENALTY = 3.0
MAX_PROMPT_WORDS = 60

_COMMON_WORDS = frozenset(
    """a an the and or but if then else of to in on at by for with from as is are was were be been it its
    this that these those you your i me my we our they their he she his her them do does did how what
    which who when where why can could should would will into over under up down out off about than so
    not no each every any some all more most much very just only also too one two three four five per
    six again against along another around automatically available bad because becomes begin bring call
    choose closed compare completely contact correct count create deal default delete drop during easier
    end everything expected explain explains extra feel feels find finish fixed follow form going great
    half hand has head helps home inside issue large late learn left length limit lots love lower makes
    making matter mix months move moving names needs never number order other outside own person
    possible put quarter questions raise ready report room search second secret see several shift show
    simple sit smaller soon space spot starting stays still store strong such taking tell thin through
    together tool top track true turn type using wait whether whole within without working world""".split()
)


def _words(text: str) -> list[str]:
    return re.findall(r"[a-z0-9][a-z0-9'/.-]*[a-z0-9]|[a-z0-9]", text.lower())


def _topic_text(spec: dict) -> str:
    pieces = list(spec["questions"]) + list(spec["tips"])
    for entry in spec["items"]:
        pieces += entry
    return " ".join(pieces).replace("{item}", " ")


def _keywords() -> dict[str, frozenset[str]]:
    """Words that appear in one topic's text and in no other topic's text or shared wording."""
    generic = (
        GENERIC_QUESTIONS + PREAMBLES + CLOSERS + OPENERS + EVASIVE_REPLIES + RUDE_REPLIES + VAGUE_REPLIES
    )
    shared = set(_words(" ".join(generic).replace("{item}", " ").replace("{Item}", " "))) | _COMMON_WORDS
    vocab = {name: set(_words(_topic_text(spec) + " " + name)) for name, spec in TOPICS.items()}
    keywords = {}
    for name, words in vocab.items():
        others = set().union(*(v for other, v in vocab.items() if other != name))
        keywords[name] = frozenset(w for w in words - others - shared if len(w) > 2 and not w.isdigit())
    return keywords


TOPIC_KEYWORDS: dict[str, frozenset[str]] = _keywords()


def _last_human_turn(prompt: str) -> str:
    text = prompt.rsplit("\n\nHuman:", 1)[-1]
    return text.split("\n\nAssistant:", 1)[0]


def prompt_topic(prompt: str) -> str | None:
    """The topic whose keywords appear most often in the prompt's last Human turn (None if no keyword)."""
    words = _words(_last_human_turn(prompt))
    hits = {name: sum(w in keywords for w in words) for name, keywords in TOPIC_KEYWORDS.items()}
    best = max(hits, key=hits.get)
    return best if hits[best] > 0 else None


def rule_score(prompt: str, response: str) -> float:
    """Score a reply to an HH-style prompt; higher is better.

    score = (distinct keywords of the prompt's topic in the reply)
          - (distinct keywords of every other topic in the reply)
          - 3 * (evasive or rude phrases in the reply)

    The prompt's topic is read from its last Human turn (see ``prompt_topic``); with no recognisable
    topic every keyword counts as off-topic.
    """
    topic = prompt_topic(prompt)
    words = set(_words(response))
    on_topic = len(words & TOPIC_KEYWORDS[topic]) if topic else 0
    off_topic = sum(len(words & keywords) for name, keywords in TOPIC_KEYWORDS.items() if name != topic)
    text = response.lower().replace("\u2019", "'")
    phrases = sum(text.count(p) for p in EVASIVE_PHRASES + RUDE_PHRASES)
    return float(on_topic - off_topic - PHRASE_PENALTY * phrases)


def _question(rng: random.Random, topic: str, item: str) -> str:
    templates = TOPICS[topic]["questions"] + GENERIC_QUESTIONS
    parts = [rng.choice(PREAMBLES)] if rng.random() < 0.5 else []
    if rng.random() < 0.2:
        parts.append(rng.choice(PREAMBLES))
    parts.append(rng.choice(templates).format(item=item))
    if rng.random() < 0.3:
        parts.append(rng.choice(CLOSERS))
    return " ".join(dict.fromkeys(parts))  # dict keeps order and drops a repeated preamble


def _helpful(rng: random.Random, topic: str, entry: tuple[str, str, str]) -> str:
    """A short answer, or an optional opener + the full answer + up to two of the topic's tips."""
    _, answer, short_answer = entry
    if rng.random() < 0.25:
        return short_answer
    parts = [rng.choice(OPENERS)] if rng.random() < 0.5 else []
    parts.append(answer)
    tips = list(TOPICS[topic]["tips"])
    rng.shuffle(tips)
    parts += tips[: rng.choice((0, 0, 1, 2))]
    return " ".join(parts)


# How the assistant that wrote both replies of a row behaves: HH's two replies come from the same model,
# and the human marks the better one, so the chosen reply is itself often flawed. Here each reply is
# drawn from this mix, and the rule picks the better one as chosen.
REPLY_MIX = {"helpful": 0.4, "vague": 0.35, "off_topic": 0.05, "evasive": 0.1, "rude": 0.1}


def _reply(rng: random.Random, topic: str, entry: tuple[str, str, str]) -> str:
    """One reply of the assistant: helpful, vague, a helpful answer about another topic, evasive or rude."""
    kind = rng.choices(list(REPLY_MIX), weights=list(REPLY_MIX.values()))[0]
    if kind == "helpful":
        return _helpful(rng, topic, entry)
    if kind == "vague":
        return rng.choice(VAGUE_REPLIES).format(item=entry[0], Item=entry[0][0].upper() + entry[0][1:])
    if kind == "off_topic":
        other = rng.choice([name for name in TOPICS if name != topic])
        return _helpful(rng, other, rng.choice(TOPICS[other]["items"]))
    item = entry[0]
    pool = EVASIVE_REPLIES if kind == "evasive" else RUDE_REPLIES
    replies = rng.sample(pool, 2) if rng.random() < 0.4 else [rng.choice(pool)]
    return " ".join(replies).format(item=item, Item=item[0].upper() + item[1:])


def _row(rng: random.Random, question: str, topic: str, entry: tuple[str, str, str]) -> dict[str, str]:
    prompt = ""
    if rng.random() < 0.3:  # multi-turn: an earlier, already answered question shared by both replies
        earlier_topic = rng.choice(list(TOPICS))
        earlier_item, earlier_answer, _ = rng.choice(TOPICS[earlier_topic]["items"])
        earlier_question = rng.choice(TOPICS[earlier_topic]["questions"]).format(item=earlier_item)
        prompt = f"\n\nHuman: {earlier_question}\n\nAssistant: {earlier_answer}"
        if len(f"{prompt} {question}".split()) > MAX_PROMPT_WORDS:
            prompt = ""
    prompt += f"\n\nHuman: {question}\n\nAssistant:"
    # Two replies from the same assistant, the better one by the rule chosen (a tie draws the second again).
    first = _reply(rng, topic, entry)
    while True:
        second = _reply(rng, topic, entry)
        first_score, second_score = rule_score(prompt, first), rule_score(prompt, second)
        if first_score != second_score:
            break
    chosen, rejected = (first, second) if first_score > second_score else (second, first)
    return {"chosen": f"{prompt} {chosen}", "rejected": f"{prompt} {rejected}"}


def make_rows(n_train: int, n_test: int, seed: int) -> tuple[list[dict[str, str]], list[dict[str, str]]]:
    """Train and test rows; every final question is unique, so no test prompt appears in train."""
    rng = random.Random(seed)
    seen: set[str] = set()
    rows: list[dict[str, str]] = []
    while len(rows) < n_train + n_test:
        topic = rng.choice(list(TOPICS))
        entry = rng.choice(TOPICS[topic]["items"])
        question = _question(rng, topic, entry[0])
        if question in seen:
            continue
        seen.add(question)
        rows.append(_row(rng, question, topic, entry))
    return rows[:n_train], rows[n_train:]


def write_jsonl(path: Path, rows: list[dict[str, str]]) -> None:
    with open(path, "w", encoding="utf-8", newline="\n") as f:
        for row in rows:
            f.write(json.dumps(row, ensure_ascii=False) + "\n")


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--out", type=Path, required=True, help="output folder for train.jsonl and test.jsonl"
    )
    parser.add_argument("--train", type=int, default=2000, help="number of train rows")
    parser.add_argument("--test", type=int, default=200, help="number of test rows")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    train, test = make_rows(args.train, args.test, args.seed)
    args.out.mkdir(parents=True, exist_ok=True)
    write_jsonl(args.out / "train.jsonl", train)
    write_jsonl(args.out / "test.jsonl", test)


if __name__ == "__main__":
    main()
