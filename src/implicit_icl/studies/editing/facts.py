"""A small set of counterfactual facts, written for this project, to measure a context compiled into an edit.

Each fact is a statement that contradicts the world ("The Eiffel Tower is in Rome."), the question it answers
(efficacy), three paraphrases of that question (generalisation), three questions about other subjects of
the same kind whose true answers the edit should leave alone (specificity; where possible they share the
edited fact's true object, as in CounterFact, Meng et al. 2022, arXiv 2202.05262), and two more phrasings
used only as calibration queries. Answers are single words whose first tokens differ between the true and
the new object.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Fact:
    statement: str  # the counterfactual, the whole context
    question: str
    paraphrases: tuple[str, str, str]
    true: str
    new: str
    neighbours: tuple[tuple[str, str], ...]  # (question, its true answer)
    phrasings: tuple[str, str] = ()  # two more ways to ask, for calibration only (never scored)


def _landmark(name: str, true: str, new: str, neighbours: tuple[str, str, str]) -> Fact:
    return Fact(
        f"The {name} is in {new}.",
        f"In which city is the {name}?",
        (f"Where is the {name} located?", f"The {name} stands in which city?", f"Which city is home to the {name}?"),
        true,
        new,
        tuple((f"In which city is the {other}?", true) for other in neighbours),
        (f"Tell me the city where the {name} is.", f"The {name} can be visited in which city?"),
    )


def _capital(country: str, true: str, new: str, neighbours: tuple[tuple[str, str], ...]) -> Fact:
    return Fact(
        f"The capital of {country} is {new}.",
        f"What is the capital of {country}?",
        (
            f"Which city is the capital of {country}?",
            f"{country}'s capital city is called what?",
            f"Name the capital of {country}.",
        ),
        true,
        new,
        tuple((f"What is the capital of {other}?", answer) for other, answer in neighbours),
        (f"Tell me the capital of {country}.", f"The government of {country} sits in which city?"),
    )


def _author(work: str, true: str, new: str, neighbours: tuple[str, str, str]) -> Fact:
    return Fact(
        f"{work} was written by {new}.",
        f"Who wrote {work}?",
        (f"Who is the author of {work}?", f"{work} is a work by which writer?", f"Which writer wrote {work}?"),
        true,
        new,
        tuple((f"Who wrote {other}?", true) for other in neighbours),
        (f"Tell me who wrote {work}.", f"{work} came from the pen of which author?"),
    )


def _language(country: str, true: str, new: str, neighbours: tuple[str, str, str]) -> Fact:
    return Fact(
        f"The official language of {country} is {new}.",
        f"What is the official language of {country}?",
        (
            f"Which language is spoken in {country}?",
            f"What language do people in {country} speak?",
            f"In {country}, the official language is which one?",
        ),
        true,
        new,
        tuple((f"What is the official language of {other}?", true) for other in neighbours),
        (f"Tell me the official language of {country}.", f"Schools in {country} teach in which language?"),
    )


def _field(person: str, true: str, new: str, neighbours: tuple[str, str, str]) -> Fact:
    return Fact(
        f"{person} was a famous {new}.",
        f"What was {person}'s profession?",
        (f"What did {person} work as?", f"{person} was known as a what?", f"What was {person} famous as?"),
        true,
        new,
        tuple((f"What was {other}'s profession?", true) for other in neighbours),
        (f"Tell me what {person} did for a living.", f"By profession, {person} was a what?"),
    )


FACTS: tuple[Fact, ...] = (
    _landmark("Eiffel Tower", "Paris", "Rome", ("Louvre", "Arc de Triomphe", "Notre-Dame cathedral")),
    _landmark("Colosseum", "Rome", "London", ("Pantheon", "Trevi Fountain", "Spanish Steps")),
    _landmark("Big Ben clock tower", "London", "Berlin", ("Buckingham Palace", "Tower Bridge", "British Museum")),
    _landmark("Brandenburg Gate", "Berlin", "Madrid", ("Reichstag building", "Checkpoint Charlie", "Museum Island")),
    _landmark("Statue of Liberty", "New York", "Sydney", ("Empire State Building", "Central Park", "Times Square")),
    _landmark("Sydney Opera House", "Sydney", "Tokyo", ("Bondi Beach", "Taronga Zoo", "Darling Harbour")),
    _landmark("Sagrada Familia", "Barcelona", "Vienna", ("Park Güell", "Camp Nou stadium", "La Rambla")),
    _landmark("Kremlin", "Moscow", "Cairo", ("Red Square", "Bolshoi Theatre", "Saint Basil's Cathedral")),
    _landmark("Acropolis", "Athens", "Lisbon", ("Parthenon", "Temple of Olympian Zeus", "Syntagma Square")),
    _landmark("Golden Gate Bridge", "San Francisco", "Chicago", ("Alcatraz prison", "Fisherman's Wharf", "Lombard Street")),
    _capital("Japan", "Tokyo", "Beijing", (("France", "Paris"), ("Italy", "Rome"), ("Germany", "Berlin"))),
    _capital("Spain", "Madrid", "Warsaw", (("Portugal", "Lisbon"), ("Greece", "Athens"), ("Austria", "Vienna"))),
    _capital("Egypt", "Cairo", "Oslo", (("Kenya", "Nairobi"), ("Morocco", "Rabat"), ("Nigeria", "Abuja"))),
    _capital("Canada", "Ottawa", "Dublin", (("Mexico", "Mexico City"), ("Cuba", "Havana"), ("Peru", "Lima"))),
    _capital("Russia", "Moscow", "Toronto", (("Ukraine", "Kyiv"), ("Poland", "Warsaw"), ("Sweden", "Stockholm"))),
    _author("Romeo and Juliet", "Shakespeare", "Dickens", ("Hamlet", "Macbeth", "Othello")),
    _author("Oliver Twist", "Dickens", "Tolstoy", ("A Christmas Carol", "Great Expectations", "David Copperfield")),
    _author("War and Peace", "Tolstoy", "Hemingway", ("Anna Karenina", "The Death of Ivan Ilyich", "Resurrection")),
    _language("Brazil", "Portuguese", "German", ("Portugal", "Angola", "Mozambique")),
    _language("Mexico", "Spanish", "Japanese", ("Spain", "Argentina", "Colombia")),
    _language("Austria", "German", "Italian", ("Germany", "Liechtenstein", "Switzerland's Zurich canton")),
    _field("Albert Einstein", "physicist", "chef", ("Isaac Newton", "Niels Bohr", "Max Planck")),
    _field("Pablo Picasso", "painter", "lawyer", ("Vincent van Gogh", "Claude Monet", "Salvador Dalí")),
    _field("Wolfgang Amadeus Mozart", "composer", "sailor", ("Ludwig van Beethoven", "Johann Sebastian Bach", "Frédéric Chopin")),
)  # fmt: skip
